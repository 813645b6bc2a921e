"""A slot's status file: what `appliance status`, `top` and the metrics read of a runner."""

from __future__ import annotations

import time

from appliance.paths import Home
from appliance.runner.counters import SlotCounters, read_counters
from appliance.runner.status import StatusFile, read_status


def eventually(check, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def test_a_lazy_update_reaches_the_file_on_its_own(tmp_path):
    home = Home.at(tmp_path)
    status = StatusFile(home, "slot-0")
    status.update(state="idle")
    status.job_started("exp-1", "local_q", "local", lazy=True)
    status.update(state="running", workload={"pid": 1, "start_ticks": 2}, lazy=True)
    # nobody calls the status again (a long workload): it still shows, without a flush
    on_disk = eventually(lambda: (read_status(home, "slot-0") or {}).get("state") == "running")
    assert on_disk, read_status(home, "slot-0")
    assert read_status(home, "slot-0")["experiment"] == "exp-1"
    assert not status.dirty


def test_a_write_or_a_flush_carries_the_lazy_updates_before_it(tmp_path):
    home = Home.at(tmp_path)
    status = StatusFile(home, "slot-0")
    status.update(state="preparing", output="/x/output", lazy=True)
    status.flush()
    assert read_status(home, "slot-0")["state"] == "preparing"
    status.update(experiment="exp-2", lazy=True)
    status.update(state="uploading")
    seen = read_status(home, "slot-0")
    assert (seen["state"], seen["experiment"], seen["output"]) == ("uploading", "exp-2", "/x/output")


def test_each_jobs_end_and_counts_are_on_disk_at_once_even_in_a_burst(tmp_path):
    home = Home.at(tmp_path)
    status = StatusFile(home, "slot-1")
    status.counters = SlotCounters(home, "slot-1")
    for n in range(3):
        status.job_started(f"exp-{n}", "local_q", "local", lazy=True)
        status.update(state="running", workload={"pid": 1, "start_ticks": 2}, lazy=True)
        status.job_finished("success", 0, "")
        # what `appliance status` shows between two jobs: this one's result, whoever looks
        seen = read_status(home, "slot-1")
        assert (seen["state"], seen["last_result"]["experiment"]) == ("idle", f"exp-{n}")
        counted = read_counters(home, "slot-1")
        assert counted["jobs_started"]["local_q"] == counted["jobs_finished"]["local_q"]["success"] == n + 1
