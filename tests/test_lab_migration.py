"""A home from the release before the API keeps working after the upgrade: its experiments stay
root's to read, the first member to use it gets their identity, and its shared folders close.

The old release is this repository's last commit without appliance/api/ (git archive), run with
PYTHONPATH pointing at it, so supervisord and every program it starts are the old code too."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from tests.appliance_fixtures import make_home, stop_home
from tests.realparts import need, wait_for

REPO = Path(__file__).resolve().parent.parent


def _last_release() -> str | None:
    try:
        added = subprocess.run(["git", "-C", str(REPO), "log", "--diff-filter=A", "--format=%H", "--",
                                "appliance/api/server.py"], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{added[-1]}^" if added else None


def _finished(facts: dict, key: str) -> dict | None:
    for slot in facts["slots"]:
        if (slot.get("last_result") or {}).get("experiment") == key:
            return slot["last_result"]
    return None


def test_a_home_from_the_last_release_keeps_working(lab_users, tmp_path_factory):
    base = _last_release()
    need(base is not None, "this repository's git history (to get the release before the API)")
    tmp = tmp_path_factory.mktemp("migration")
    old = tmp / "old"
    old.mkdir()
    subprocess.run(f"git -C {REPO} archive {base} | tar -x -C {old}", shell=True, check=True)
    # as installed: its templates are the package appliance.templates (else this checkout's are found)
    shutil.copytree(old / "templates", old / "appliance" / "templates")
    (old / "appliance" / "templates" / "__init__.py").touch()
    home = make_home(tmp)
    old_env = {**home.env, "PYTHONPATH": str(old)}

    def old_cli(*args):
        done = subprocess.run([sys.executable, "-m", "appliance", "--home", str(home.root), *args], cwd=str(old),
                              env=old_env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    try:
        old_cli("up", "--timeout", "120")
        assert not (home.home.run_dir / "api.sock").exists()  # really the old release
        ws = tmp / "ws"
        ws.mkdir()
        (ws / "train.py").write_text("print('from the old release')\n")
        key = old_cli("submit", "--no-freeze", "--ram", "256mb", "--dir", str(ws), "train.py").strip().splitlines()[-1]
        wait_for("the old job", lambda: _finished(json.loads(old_cli("status", "--json")), key), timeout=240)
        old_cli("down")

        home.cli("up", "--timeout", "120")  # the new release on the same home
        got = home.cli("results", key, "--dest", str(tmp / "old-out"))
        assert "from the old release" in (tmp / "old-out" / "output" / "output").read_text(), got.stdout
        for folder in (home.home.queue_root, home.home.studioml_home):
            assert stat.S_IMODE(os.stat(folder).st_mode) in (0o3770, 0o700)

        alice = lab_users["alice"]
        alice.appliance_root = home.root
        mine = alice.home_dir / "ws-migrated"
        mine.mkdir()
        (mine / "train.py").write_text("print('alice after the upgrade')\n")
        subprocess.run(["chown", "-R", alice.name, str(mine)], check=True)
        out = alice.cli("submit", "--no-freeze", "--ram", "256mb", "--dir", str(mine), "train.py")
        assert out.returncode == 0, out.stderr
        new_key = out.stdout.strip().splitlines()[-1]
        wait_for("alice's job", lambda: _finished(home.status(), new_key), timeout=240)
        logs = alice.cli("logs", new_key)
        assert logs.returncode == 0 and "alice after the upgrade" in logs.stdout, logs.stderr
        assert str(alice.uid) in json.loads(home.home.store_credentials.read_text())["members"]
        theirs = alice.cli("logs", key)
        assert theirs.returncode != 0 and "from the old release" not in theirs.stdout
        records = home.home.status_dir / "experiments"
        assert stat.S_IMODE(records.stat().st_mode) == 0o700
    finally:
        stop_home(home)
