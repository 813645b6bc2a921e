"""Experiments end to end on a running appliance: `appliance submit` -> a slot runs it ->
its output is in the store; a runner killed mid-job -> the job runs again and completes."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.appliance_fixtures import artifact_text, last_result, submit
from tests.realparts import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "train.py").write_text(
        "import os, sys, time\n"
        "print('hello from', os.environ.get('APPLIANCE_SLOT'), 'args', sys.argv[1:], flush=True)\n"
        "print('cpus', sorted(os.sched_getaffinity(0)), flush=True)\n"
        "if '--sleep' in sys.argv:\n"
        "    print('started', flush=True)\n"
        "    time.sleep(float(sys.argv[sys.argv.index('--sleep') + 1]))\n"
        "print('done', flush=True)\n")
    return ws


def test_submitted_experiment_runs_in_a_slot_and_its_output_reaches_the_store(running_appliance, workspace):
    key = submit(running_appliance, workspace, "train.py", "--lr", "0.1")
    result = wait_for("the experiment to finish", lambda: last_result(running_appliance, key))
    assert result["outcome"] == "success", result
    output = wait_for("the output artifact", lambda: artifact_text(running_appliance, key))
    assert "args ['--lr', '0.1']" in output and "done" in output
    # it ran pinned to the CPUs of the slot that ran it
    slot = next(s for s in running_appliance.status()["slots"] if (s["last_result"] or {}).get("experiment") == key)
    assert f"cpus {slot['cpus']}" in output


def test_a_runner_killed_mid_job_gets_its_job_run_again_to_completion(running_appliance, workspace):
    key = submit(running_appliance, workspace, "train.py", "--sleep", "6")

    def running_slot():
        for slot in running_appliance.status()["slots"]:
            if slot["experiment"] == key and slot["runner_state"] == "running":
                return slot
        return None

    slot = wait_for("the job to start", running_slot)
    os.kill(slot["pid"], signal.SIGKILL)  # the runner itself: supervisord starts a new one

    result = wait_for("the job to run again and finish", lambda: last_result(running_appliance, key), timeout=240)
    assert result["outcome"] == "success", result
    output = wait_for("the output artifact", lambda: artifact_text(running_appliance, key))
    assert "done" in output
    queue = json.loads(running_appliance.cli("queue", "ls", "--json").stdout)
    assert json.dumps(queue).count(key) == 0  # nothing of it left waiting, claimed or dead


def test_a_request_no_slot_could_ever_run_is_dead_lettered_with_the_reason(running_appliance, workspace):
    key = submit(running_appliance, workspace, "train.py", ram="64gb")
    dead = wait_for("the dead letter", lambda: key in running_appliance.cli("queue", "dead").stdout)
    assert dead
    listing = running_appliance.cli("queue", "dead").stdout
    assert "64" in listing and "ram" in listing  # the reason says what it needs
