"""Experiment records under HOME/status hold where results are: not for every user of the box."""

from __future__ import annotations

import os
import stat
import subprocess

from appliance.paths import Home, shared_gid
from appliance.runner.status import experiment_record_path, find_experiment, record_experiment
from tests.realparts import need


def test_records_are_roots_alone(tmp_path):
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
    # they name every member's jobs: not even the group reads them (a member's results are in their bucket)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    gid = shared_gid()
    other = subprocess.run(["cat", str(path)], user=65534, group=65534, extra_groups=[gid] if gid else [],
                           capture_output=True, text=True)
    assert other.returncode != 0 and "Permission denied" in other.stderr


def test_an_older_homes_group_readable_records_are_closed_at_the_next_record(tmp_path):
    home = Home.at(tmp_path / "home")
    home.ensure()
    folder = home.status_dir / "experiments"
    folder.mkdir(parents=True)
    folder.chmod(0o2750)
    record_experiment(home, "k2", {})
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_no_other_account_reads_a_slots_status(tmp_path):
    """A slot's status file names the running job's key and owner: members see their own jobs
    through the API, and no workload or other account reads another tenant's."""
    need(os.geteuid() == 0, "root (to try reading as another user)")
    base = tmp_path / "open"
    base.mkdir()
    for d in (tmp_path, base):
        d.chmod(0o755)
    home = Home.at(base / "home")
    home.ensure()
    (home.status_dir / "slot-0.json").write_text('{"experiment": "secret-key"}')
    gid = shared_gid()
    other = subprocess.run(["cat", str(home.status_dir / "slot-0.json")], user=65534, group=65534,
                           extra_groups=[gid] if gid else [], capture_output=True, text=True)
    assert other.returncode != 0 and "Permission denied" in other.stderr
