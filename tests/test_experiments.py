"""Experiments end to end on a running appliance: `appliance submit` -> a slot runs it ->
its output is in the store; a runner killed mid-job -> the job runs again and completes."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time

import pytest

from appliance.store.client import s3_client
from appliance.store.credentials import load_credentials

pytestmark = pytest.mark.integration


def wait_for(what, predicate, timeout=180.0, every=0.2):
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def submit(appliance, workspace, script, *args, ram="256mb"):
    result = appliance.cli("submit", "--no-freeze", "--ram", ram, "--hdd", "1gb", "--dir", str(workspace),
                           script, *args)
    key = result.stdout.strip().splitlines()[-1]
    assert key, result.stdout
    return key


def store_client(appliance):
    creds = load_credentials(appliance.home)
    port = appliance.home.config_file.read_text().split("port = ")[1].split()[0]
    return s3_client(f"http://127.0.0.1:{port}", creds.access_key, creds.secret_key)


def artifact_text(appliance, key, name="output") -> str | None:
    """All text inside the experiment's `name` artifact tar, or None while it is not there."""
    client = store_client(appliance)
    try:
        body = client.get_object(Bucket="appliance", Key=f"experiments/{key}/{name}.tar")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    texts = []
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                texts.append(tar.extractfile(member).read().decode(errors="replace"))
    return "\n".join(texts)


def last_result(appliance, key):
    for slot in appliance.status()["slots"]:
        result = slot.get("last_result") or {}
        if result.get("experiment") == key:
            return result
    return None


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
