"""Experiment records under HOME/status hold where results are: not for every user of the box."""

from __future__ import annotations

import os
import stat
import subprocess

from appliance.paths import Home, shared_gid
from appliance.runner.status import experiment_record_path, find_experiment, record_experiment
from tests.realparts import need


def test_records_are_for_the_group_or_root_only(tmp_path):
    need(os.geteuid() == 0, "root (to try reading as another user)")
    base = tmp_path / "open"
    base.mkdir()
    for d in (tmp_path, base):  # pytest's tmp_path is root's alone; let others walk in
        d.chmod(0o755)
    home = Home.at(base / "home")
    home.ensure()
    old = os.umask(0o022)  # a usual umask would give 0644
    try:
        record_experiment(home, "k1", {"artifacts": {"output": {"key": "experiments/k1/output.tar"}}})
    finally:
        os.umask(old)
    path = experiment_record_path(home, "k1")
    assert find_experiment(home, "k1")["artifacts"]["output"]["key"] == "experiments/k1/output.tar"
    gid = shared_gid()
    if gid is None:  # no `appliance` group on this machine: root's alone
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    else:
        assert (stat.S_IMODE(path.stat().st_mode), path.stat().st_gid) == (0o640, gid)
        assert (stat.S_IMODE(path.parent.stat().st_mode), path.parent.stat().st_gid) == (0o2750, gid)
    other = subprocess.run(["cat", str(path)], user=65534, group=65534, extra_groups=[],
                           capture_output=True, text=True)
    assert other.returncode != 0 and "Permission denied" in other.stderr
