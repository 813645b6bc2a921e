"""doctor runs the launcher as an unprivileged user: an install others cannot run is found."""

from __future__ import annotations

import os
import shutil

from appliance.everyone import runs_for_others
from tests.realparts import need


def _script(folder, mode):
    folder.mkdir(mode=mode)
    os.chmod(folder, mode)
    script = folder / "appliance"
    script.write_text("#!/bin/sh\necho appliance 0\n")
    script.chmod(0o755)
    return str(script)


def test_a_launcher_others_can_run_is_ok_and_one_under_a_private_folder_is_not(tmp_path):
    need(os.geteuid() == 0 and shutil.which("runuser") is not None, "root and runuser")
    os.chmod(tmp_path, 0o755)
    good = runs_for_others([_script(tmp_path / "open", 0o755)])
    assert good.ok and "tried as nobody" in good.detail
    bad = runs_for_others([_script(tmp_path / "private", 0o700)])
    assert not bad.ok
    assert "fails for other users" in bad.detail and "PYTHON=/usr/bin/python3" in bad.detail
