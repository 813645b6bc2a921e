"""Job control on a real appliance: jobs, history, cancel, hold, release, requeue, wait, arrays,
with the real CLI, real slots, real runners, and real member accounts (runuser) where owners matter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from appliance.jobs.table import JobTable
from tests.appliance_fixtures import make_home, stop_home, submit


@pytest.fixture(scope="module")
def lab(lab_users, tmp_path_factory):
    home = make_home(tmp_path_factory.mktemp("appliance"))
    home.cli("up", "--timeout", "120")
    for user in lab_users.values():
        user.appliance_root = home.root
    yield home, lab_users
    stop_home(home)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    (ws / "exit3.py").write_text("print('about to exit 3', flush=True)\nraise SystemExit(3)\n")
    (ws / "long.py").write_text("import time\nprint('started, working', flush=True)\ntime.sleep(600)\n")
    (ws / "index.py").write_text("import os\nprint('index', os.environ['APPLIANCE_ARRAY_INDEX'], "
                                 "os.environ.get('lr', '-'), flush=True)\n")
    (ws / "ok.py").write_text("print('ok')\n")
    os.chmod(ws, 0o755)
    for f in ws.iterdir():
        os.chmod(f, 0o644)
    return ws


def jobs_json(appliance, *extra, user=None) -> list[dict]:
    r = (user.cli("jobs", "--json") if user else appliance.cli("jobs", "--json", *extra))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def history_json(appliance, *extra) -> list[dict]:
    return json.loads(appliance.cli("history", "--json", *extra).stdout)


def until(what, timeout=120.0, step=0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = what()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def slots_of(appliance) -> int:
    return len(appliance.status()["slots"])


def test_wait_on_a_job_that_exits_3_returns_3_and_history_says_how(lab, workspace):
    appliance, _ = lab
    key = submit(appliance, workspace, "exit3.py")
    r = appliance.cli("wait", key, check=False, timeout=300)
    assert r.returncode == 3, r.stderr
    row = next(j for j in history_json(appliance) if j["key"] == key)
    assert (row["state"], row["class"], row["exit_code"]) == ("failed", "user", 3)
    assert row["cpu_seconds"] is not None and row["wall_seconds"] is not None
    assert appliance.cli("results", key, "--dest", str(workspace.parent / key), check=False).returncode == 3
    logs = appliance.cli("logs", "-f", key, check=False)
    assert logs.returncode == 3 and "about to exit 3" in logs.stdout


def test_cancel_a_running_job_ends_it_cancelled_with_its_partial_output(lab, workspace):
    appliance, _ = lab
    key = submit(appliance, workspace, "long.py")
    until(lambda: any(j["key"] == key and j["state"] == "running" for j in jobs_json(appliance)))
    until(lambda: "started, working" in appliance.cli("logs", key, check=False).stdout)
    r = appliance.cli("cancel", key)
    assert "cancelling" in r.stdout
    assert appliance.cli("wait", key, check=False, timeout=120).returncode == 143
    row = next(j for j in history_json(appliance) if j["key"] == key)
    assert (row["state"], row["class"]) == ("cancelled", "cancelled")
    assert "started, working" in appliance.cli("logs", key, check=False).stdout  # partial output kept
    assert not any(j["key"] == key for j in jobs_json(appliance))


def test_an_array_of_5_waited_on_by_its_base_key(lab, workspace):
    appliance, _ = lab
    r = appliance.cli("submit", "--no-freeze", "--ram", "256mb", "--array", "0-4%2", "--dir", str(workspace),
                      "index.py")
    lines = r.stdout.split()
    base = lines[-1]
    assert lines[:-1] == [f"{base}-{i}" for i in range(5)]
    assert appliance.cli("wait", base, check=False, timeout=400).returncode == 0
    done = [j for j in history_json(appliance) if j["key"].startswith(base + "-")]
    assert sorted(j["key"] for j in done) == [f"{base}-{i}" for i in range(5)]
    assert {j["state"] for j in done} == {"done"}
    assert {j["array_base"] for j in done} == {base}
    for i in (0, 4):
        assert f"index {i}" in appliance.cli("logs", f"{base}-{i}").stdout


def test_a_sweep_is_an_array_over_the_cross_product(lab, workspace):
    appliance, _ = lab
    r = appliance.cli("submit", "--no-freeze", "--ram", "256mb", "--sweep", "lr=0.1,0.01", "--sweep", "depth=2,4",
                      "--dir", str(workspace), "index.py")
    base = r.stdout.split()[-1]
    assert appliance.cli("wait", base, timeout=400).returncode == 0
    logs = sorted(appliance.cli("logs", f"{base}-{i}").stdout.split("\n")[0] for i in range(4))
    assert logs == ["index 0 0.1", "index 1 0.1", "index 2 0.01", "index 3 0.01"]
    bad = appliance.cli("submit", "--no-freeze", "--sweep", "lr", "--dir", str(workspace), "index.py", check=False)
    assert bad.returncode == 2 and "NAME=V1,V2" in bad.stderr


def test_held_jobs_wait_in_line_and_a_member_sees_and_acts_on_their_own_only(lab, workspace):
    appliance, users = lab
    alice, bob = users["alice"], users["bob"]
    busy = [submit(appliance, workspace, "long.py") for _ in range(slots_of(appliance))]
    until(lambda: sum(j["state"] == "running" for j in jobs_json(appliance)) == len(busy))
    waiting = submit(appliance, workspace, "ok.py")
    row = until(lambda: next((j for j in jobs_json(appliance) if j["key"] == waiting), None))
    assert row["state"] == "queued" and row["why"].startswith("1st in local_appliance;") and "busy" in row["why"]
    follow = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(appliance.root), "logs", "-f",
                               waiting], env=appliance.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert follow.stderr.readline().startswith(f"appliance: {waiting} waits: 1st in local_appliance;")
    for field in ("key", "state", "owner", "queue", "slot"):
        assert field in row

    # alice's own job: a copy of that request, written into the queue folder by alice herself
    table = JobTable.of(appliance.home)
    queue, body = table.request_body(waiting)
    table.close()
    data = json.loads(body)
    data["experiment"]["key"] = mine = f"alice-{waiting}"
    path = appliance.home.queue_root / queue / f"alice-{os.getpid()}"
    r = alice.run("sh", "-c", f"cat > {path}", input=json.dumps(data))
    assert r.returncode == 0, r.stderr
    mine_row = until(lambda: next((j for j in jobs_json(None, user=alice) if j["key"] == mine), None))
    assert mine_row["owner"] == alice.name
    assert [j["key"] for j in jobs_json(None, user=alice)] == [mine]  # not root's jobs
    assert jobs_json(None, user=bob) == []  # not alice's

    r = bob.cli("cancel", mine)
    assert r.returncode != 0 and f"no job {mine} of yours" in r.stderr
    r = bob.cli("hold", mine)
    assert r.returncode != 0
    assert alice.cli("hold", mine).returncode == 0
    assert next(j for j in jobs_json(appliance) if j["key"] == mine)["why"] == f"held (appliance release {mine})"
    assert alice.cli("release", mine).returncode == 0
    assert next(j for j in jobs_json(appliance) if j["key"] == mine)["state"] == "queued"
    assert alice.cli("cancel", mine).returncode == 0  # a waiting job: it never starts
    assert appliance.cli("cancel", *busy).returncode == 0
    assert appliance.cli("wait", waiting, timeout=300).returncode == 0
    out, _ = follow.communicate(timeout=120)
    assert follow.returncode == 0 and "ok" in out.split()  # it waited, then streamed the job's output
    r = alice.cli("wait", mine)
    assert r.returncode == 143, r.stderr
    r = bob.cli("requeue", mine)
    assert r.returncode != 0 and f"no job {mine} of yours" in r.stderr
    assert bob.cli("history", "--json").returncode == 0 and json.loads(bob.cli("history", "--json").stdout) == []
    assert [j["key"] for j in json.loads(alice.cli("history", "--json").stdout)] == [mine]


def test_requeue_runs_a_failed_job_again_with_its_lineage(lab, workspace):
    appliance, _ = lab
    key = submit(appliance, workspace, "exit3.py")
    assert appliance.cli("wait", key, check=False, timeout=300).returncode == 3
    again = appliance.cli("requeue", key).stdout.strip()
    assert again == f"{key}.r2"
    assert appliance.cli("wait", again, check=False, timeout=300).returncode == 3
    row = next(j for j in history_json(appliance) if j["key"] == again)
    assert row["requeued_from"] == key and row["state"] == "failed"
    assert "about to exit 3" in appliance.cli("logs", again).stdout


def test_the_table_survives_down_and_up(lab):
    appliance, _ = lab
    before = {j["key"]: j["state"] for j in history_json(appliance, "--limit", "1000")}
    assert before
    appliance.cli("down", "--timeout", "120")
    assert {j["key"]: j["state"] for j in history_json(appliance, "--limit", "1000")} == before  # root, no API
    appliance.cli("up", "--timeout", "120")
    assert {j["key"]: j["state"] for j in history_json(appliance, "--limit", "1000")} == before


def test_a_cancel_in_the_ledger_settles_the_request_unrun_wherever_it_is_claimed(lab, workspace):
    """The cancel of a job still on a shared broker is written in the exactly-once ledger (the
    appliance's own, runner/ledger.py): whichever box claims a copy of that request settles it
    without running it."""
    from appliance.jobs.control import rekeyed
    from appliance.queues.local import enqueue
    from appliance.runner.ledger import record_cancel

    appliance, _ = lab
    key = submit(appliance, workspace, "ok.py")
    assert appliance.cli("wait", key, timeout=300).returncode == 0
    table = JobTable.of(appliance.home)
    queue, body = table.request_body(key)
    table.close()
    copy_key = f"{key}-shared"
    copy = rekeyed(body, key, copy_key)
    assert record_cancel(copy, "root", home=appliance.home)
    assert not record_cancel(copy, "root", home=appliance.home)  # a record is there: left alone
    enqueue(appliance.home.queue_root, queue, copy)  # the copy reaches a box, as from a broker
    table = JobTable.of(appliance.home)
    try:  # a message that did not come through submit is known once a runner sees it
        until(lambda: table.get(copy_key) is not None)
    finally:
        table.close()
    r = appliance.cli("wait", copy_key, check=False, timeout=300)
    assert r.returncode == 143, r.stderr
    row = next(j for j in history_json(appliance) if j["key"] == copy_key)
    assert row["state"] == "cancelled" and "before it ran" in (row["reason"] or "")
    assert "ok" not in (appliance.cli("logs", copy_key, check=False).stdout or "").split()
