"""A lab of users on one appliance: members submit, follow and fetch their own jobs without sudo,
through the API, each with a store identity of their own; no member reaches another's jobs or
objects; an outsider gets one clear line. Real accounts (useradd), the real CLI (runuser)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from botocore.exceptions import ClientError

from appliance.jobs.table import DONE
from appliance.store.client import s3_client
from tests.appliance_fixtures import finished_row, store_client
from tests.realparts import wait_for


def _workspace(user, name: str):
    ws = user.home_dir / f"ws-{name}"
    ws.mkdir(exist_ok=True)
    (ws / "train.py").write_text("import os, sys\nprint('hello from', sys.argv[1], flush=True)\n")
    subprocess.run(["chown", "-R", f"{user.name}:{user.name}", str(ws)], check=True)
    return ws


def _submit(user, ws, *args) -> str:
    out = user.cli("submit", "--no-freeze", "--ram", "256mb", "--hdd", "1gb", "--dir", str(ws), "train.py", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def _creds(user) -> dict:
    out = user.cli("user", "creds")
    assert out.returncode == 0, out.stderr
    return dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines())


@pytest.fixture(scope="module")
def jobs(lab):
    """Alice and Bob each submit a job and it runs to the end: {name: key}."""
    home, users = lab
    keys = {name: _submit(users[name], _workspace(users[name], name), name) for name in ("alice", "bob")}
    for key in keys.values():
        wait_for(f"job {key} to finish", lambda key=key: finished_row(home, key), timeout=240)
    return keys


def test_each_member_fetches_their_own_job(lab, jobs):
    home, users = lab
    for name in ("alice", "bob"):
        user, key = users[name], jobs[name]
        result = finished_row(home, key)
        assert result.state == DONE and result.class_ == "success" and result.owner_uid == user.uid, result
        logs = user.cli("logs", key)
        assert logs.returncode == 0 and f"hello from {name}" in logs.stdout, logs.stderr
        dest = user.home_dir / f"results-{name}"
        got = user.cli("results", key, "--dest", str(dest))
        assert got.returncode == 0, got.stderr
        assert f"hello from {name}" in (dest / "output" / "output").read_text()
        # an admin (root) acts on every member's job
        admin_dest = home.root.parent / f"admin-{name}"
        assert home.cli("results", key, "--dest", str(admin_dest)).returncode == 0
        assert f"hello from {name}" in (admin_dest / "output" / "output").read_text()
        assert f"hello from {name}" in home.cli("logs", key).stdout


def test_no_member_fetches_or_sees_anothers_job(lab, jobs):
    home, users = lab
    alice, bob = users["alice"], users["bob"]
    for reader, owner in ((bob, "alice"), (alice, "bob")):
        key = jobs[owner]
        logs = reader.cli("logs", key)
        assert logs.returncode != 0 and f"hello from {owner}" not in logs.stdout
        dest = reader.home_dir / f"stolen-{owner}"
        got = reader.cli("results", key, "--dest", str(dest))
        assert got.returncode != 0 and not (dest / "output" / "output").exists()
        status = reader.cli("status", "--json")
        assert status.returncode == 0 and key not in status.stdout


def test_a_members_key_opens_their_bucket_alone(lab, jobs):
    home, users = lab
    alice, bob = _creds(users["alice"]), _creds(users["bob"])
    assert alice["APPLIANCE_BUCKET"] != bob["APPLIANCE_BUCKET"] and alice["AWS_ACCESS_KEY_ID"] != bob["AWS_ACCESS_KEY_ID"]
    theirs = f"experiments/{jobs['alice']}/output.tar"
    # botocore retries a connection the store closed (it reloads its identities when a member's
    # is made), never a 403: each refusal below is the store's answer, asked once
    mine = s3_client(bob["AWS_ENDPOINT_URL"], bob["AWS_ACCESS_KEY_ID"], bob["AWS_SECRET_ACCESS_KEY"], attempts=3)
    bucket = alice["APPLIANCE_BUCKET"]
    attempts = {
        "list": lambda: mine.list_objects_v2(Bucket=bucket),
        "read": lambda: mine.get_object(Bucket=bucket, Key=theirs),
        "change": lambda: mine.put_object(Bucket=bucket, Key=theirs, Body=b"swapped"),
        "delete": lambda: mine.delete_object(Bucket=bucket, Key=theirs),
        "read the shared bucket": lambda: mine.list_objects_v2(Bucket="appliance"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(ClientError) as err:
            attempt()
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403, what
    admin = store_client(home)
    assert admin.get_object(Bucket=bucket, Key=theirs)["Body"].read() != b"swapped"
    own = mine.list_objects_v2(Bucket=bob["APPLIANCE_BUCKET"])
    assert any(o["Key"].startswith(f"experiments/{jobs['bob']}/") for o in own.get("Contents", []))


def test_a_request_naming_another_members_bucket_is_refused_before_anything_runs(lab, jobs):
    home, users = lab
    bob = users["bob"]
    alice_bucket = _creds(users["alice"])["APPLIANCE_BUCKET"]
    mine = _creds(bob)
    request = json.loads((home.home.root / "status" / "experiments" / f"{jobs['bob']}.json").read_text())
    assert request["owner_uid"] == bob.uid
    # bob's own request, pointed at alice's bucket, sent to the API as bob
    from appliance.actions.submit import build_request

    body = build_request(key="swap-1", script="train.py", script_args=[], workspace_key="blobstore/x.tar",
                         workspace_dir="/tmp", endpoint=mine["AWS_ENDPOINT_URL"], bucket=alice_bucket,
                         access_key=mine["AWS_ACCESS_KEY_ID"], secret_key=mine["AWS_SECRET_ACCESS_KEY"],
                         region="us-east-1", resources={"cpus": 1, "gpus": 0, "ram": "256mb", "hdd": "",
                                                        "gpuMem": "0gb"},
                         max_duration=None, lifetime=None, save_every="3m", env={}, pip=[], pythonenv=[],
                         pythonver="3.11", studioml_home=home.home.studioml_home, now=0.0)
    code = ("import json, sys; from appliance.api.client import Client, ApiClientError; "
            "from appliance.paths import Home\n"
            f"try:\n  Client(Home.at({str(home.root)!r})).post('/v1/submit', "
            "{'queue': 'local_appliance', 'request': json.load(sys.stdin)})\n"
            "except ApiClientError as e:\n  print(e.status, e); sys.exit(3)\n")
    out = bob.run(sys.executable, "-c", code, input=json.dumps(body))
    assert out.returncode == 3, out.stdout + out.stderr
    assert out.stdout.startswith("403 ") and alice_bucket in out.stdout and "not yours" in out.stdout
    queued = list((home.home.queue_root / "local_appliance").glob("*-*"))
    assert not any(b"swap-1" in p.read_bytes() for p in queued)


def _running(home, key) -> dict | None:
    for slot in home.status()["slots"]:
        if slot.get("experiment") == key and slot.get("runner_state") == "running":
            return slot
    return None


def test_a_running_job_is_its_submitters_alone(lab):
    home, users = lab
    alice, bob = users["alice"], users["bob"]
    ws = _workspace(alice, "sleeper")
    (ws / "train.py").write_text("import time\nprint('alive', flush=True)\ntime.sleep(25)\n")
    key = _submit(alice, ws)
    slot = wait_for(f"job {key} to run", lambda: _running(home, key), timeout=120)
    assert slot["owner_uid"] == alice.uid
    wait_for("its first line", lambda: "alive" in (alice.cli("logs", key).stdout or ""), timeout=60)
    theirs = bob.cli("logs", key)
    assert theirs.returncode != 0 and "alive" not in theirs.stdout
    assert key not in bob.cli("status").stdout and key in alice.cli("status").stdout
    # the claimed message is alice's file, 0600: bob in the same group cannot read it
    claimed = [p for p in (home.home.queue_root / ".claimed" / "local_appliance").iterdir() if p.name.count("@")]
    assert claimed
    for path in claimed:
        st = path.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (alice.uid, 0o600)
        peek = bob.run("cat", str(path))
        assert peek.returncode != 0 and "secret" not in peek.stdout
    follow = alice.cli("logs", "-f", key)  # until the job ends
    assert follow.returncode == 0 and follow.stdout.count("alive") == 1, follow.stderr


def test_queue_modes_let_in_whom_they_say_with_one_line_for_the_others(lab):
    home, users = lab
    alice, eve = users["alice"], users["eve"]
    ws = _workspace(alice, "modes")
    try:
        home.cli("config", "set", "queues.submit", "closed")
        out = alice.cli("submit", "--queue", "local_closed", "--no-freeze", "--dir", str(ws), "train.py")
        assert out.returncode != 0 and "submitting is closed on this appliance" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        assert alice.cli("status").returncode == 0  # members still follow what they sent

        home.cli("config", "set", "queues.submit", "open")
        wait_for("the socket to open", lambda: (home.home.run_dir / "api.sock").stat().st_mode & 0o777 == 0o666,
                 timeout=10)
        status = eve.cli("status", "--json")
        assert status.returncode == 0, status.stderr  # any local user, under "open"
    finally:
        home.cli("config", "set", "queues.submit", "group")
    wait_for("the socket to close", lambda: (home.home.run_dir / "api.sock").stat().st_mode & 0o777 == 0o660,
             timeout=10)
    out = eve.cli("submit", "--no-freeze", "--dir", str(ws), "train.py")
    assert out.returncode != 0 and "you are not in group appliance" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_the_shared_buckets_jobs_stay_roots(lab, tmp_path):
    """What root submits (and what a home from before members holds) stays in the shared bucket:
    root fetches it as before; no member can."""
    home, users = lab
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "train.py").write_text("print('hello from root')\n")
    key = home.cli("submit", "--no-freeze", "--ram", "256mb", "--dir", str(ws), "train.py").stdout.strip().splitlines()[-1]
    wait_for(f"job {key} to finish", lambda: finished_row(home, key), timeout=240)
    assert finished_row(home, key).owner_uid == 0
    got = home.cli("results", key, "--dest", str(tmp_path / "out"))
    assert "hello from root" in (tmp_path / "out" / "output" / "output").read_text(), got.stdout
    theirs = users["alice"].cli("logs", key)
    assert theirs.returncode != 0 and "hello from root" not in theirs.stdout


def test_a_member_sees_how_many_jobs_ended_in_the_last_hour(lab, jobs):
    """Counts of the whole box (as the waiting and running ones), through the API: no key, no owner."""
    home, users = lab
    text = users["bob"].cli("status").stdout
    line = next(ln for ln in text.splitlines() if "in the last hour:" in ln)
    assert int(line.split("in the last hour: ")[1].split(" done")[0]) >= 2  # alice's and bob's at least
    assert jobs["alice"] not in line and jobs["bob"] not in line


def test_doctor_for_a_member_checks_what_they_rely_on(lab):
    home, users = lab
    out = users["alice"].cli("doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"you are {users['alice'].name}" in out.stdout and "your key works in your bucket" in out.stdout
    outsider = users["eve"].cli("doctor")
    assert outsider.returncode != 0 and "you are not in group appliance" in outsider.stdout + outsider.stderr


def test_user_add_is_roots_and_queue_counts_are_for_members(lab):
    home, users = lab
    alice = users["alice"]
    added = home.cli("user", "add", users["eve"].name)  # an outsider's identity, made ahead by root
    assert f"bucket appliance-u-{users['eve'].name}" in added.stdout
    again = home.cli("user", "add", users["eve"].name)
    assert again.stdout == added.stdout  # made once, never rotated
    nobody = home.cli("user", "add", "no-such-account-here", check=False)
    assert nobody.returncode == 2 and "no local account named 'no-such-account-here'" in nobody.stderr
    refused = alice.cli("user", "add", alice.name)
    assert refused.returncode == 2 and "needs root" in refused.stderr
    for args in (("queue", "ls"), ("queue", "dead")):
        out = alice.cli(*args)
        assert out.returncode == 0, out.stderr


def test_following_a_job_right_after_submitting_waits_for_it_and_prints_it_all(lab):
    home, users = lab
    bob = users["bob"]
    ws = _workspace(bob, "follow")
    (ws / "train.py").write_text("import time\nfor i in range(3):\n    print('step', i, flush=True)\n"
                                 "    time.sleep(1)\n")
    key = _submit(bob, ws)
    follow = bob.cli("logs", "-f", key)  # queued a moment ago: it waits, then streams to the end
    assert follow.returncode == 0, follow.stderr
    assert [line for line in follow.stdout.splitlines() if line.startswith("step")] == ["step 0", "step 1", "step 2"]
    other = users["alice"].cli("logs", "-f", key)
    assert other.returncode != 0 and "step" not in other.stdout
