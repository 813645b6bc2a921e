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


def client_request(appliance, workspace, **resources) -> str:
    """Queue a request as a StudioML client would, with no check of what this box can run."""
    import time
    import uuid

    from appliance.actions.submit import build_request
    from appliance.config import load_config
    from appliance.queues.local import enqueue
    from appliance.store.credentials import load_client_credentials
    from appliance.store.server import endpoint_url
    from appliance.workspace_upload import send_workspace

    home = appliance.home
    config = load_config(home.config_file)
    endpoint, bucket, region = endpoint_url(config), config.object_store.bucket, config.object_store.region
    creds = load_client_credentials(home)
    ws_key, _size = send_workspace(workspace, endpoint, creds.access_key, creds.secret_key, bucket, region)
    key = f"client-{uuid.uuid4().hex[:8]}"
    body = build_request(
        key=key, script="train.py", script_args=[], workspace_key=ws_key, workspace_dir=str(workspace),
        endpoint=endpoint, bucket=bucket, access_key=creds.access_key, secret_key=creds.secret_key,
        region=region, resources={"cpus": 1, "gpus": 0, "ram": "256mb", "hdd": "", "gpuMem": "0gb", **resources},
        max_duration=None, lifetime=None, save_every="3m", env={}, pip=[], pythonenv=[], pythonver=None,
        studioml_home=home.studioml_home, now=time.time())
    enqueue(home.queue_root, "local_appliance", json.dumps(body).encode())
    return key


def test_a_request_no_slot_could_ever_run_is_refused_by_submit(running_appliance, workspace):
    result = running_appliance.cli("submit", "--no-freeze", "--ram", "64gb", "--dir", str(workspace),
                                   "train.py", check=False)
    assert result.returncode == 2, result.stderr
    assert "no slot of this box can run it" in result.stderr and "64 GiB ram" in result.stderr


def test_a_request_no_slot_could_ever_run_is_dead_lettered_with_the_reason(running_appliance, workspace):
    key = client_request(running_appliance, workspace, ram="64gb")  # the client checks nothing
    dead = wait_for("the dead letter", lambda: key in running_appliance.cli("queue", "dead").stdout)
    assert dead
    listing = running_appliance.cli("queue", "dead").stdout
    assert "64" in listing and "ram" in listing  # the reason says what it needs
