"""The job table (appliance/jobs/table.py) and what callers may do with it (control.py):
a real SQLite file, real processes where concurrency matters."""

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from appliance.jobs import control, table as jt
from appliance.jobs.intake import job_from_request, scan_local_queues
from appliance.jobs.table import Job, JobTable


@pytest.fixture
def home(tmp_path):
    h = SimpleNamespace(root=tmp_path, queue_root=tmp_path / "studioml" / "queue",
                        plan_file=tmp_path / "run" / "plan.json")
    h.queue_root.mkdir(parents=True)
    return h


@pytest.fixture
def table(home):
    t = JobTable(jt.db_path(home))
    yield t
    t.close()


ALICE = SimpleNamespace(uid=1001, name="alice", admin=False)
BOB = SimpleNamespace(uid=1002, name="bob", admin=False)
ROOT = SimpleNamespace(uid=0, name="root", admin=True)


def body(key, env=None, gpus=0):
    return json.dumps({"experiment": {"key": key, "resources_needed": {"gpus": gpus},
                                      "artifacts": {"output": {"mutable": True, "key": f"experiments/{key}/output.tar"}}},
                       "config": {"env": env or {}}}).encode()


def add(table, key, owner=ALICE, **kw):
    job = job_from_request(body(key), owner_uid=owner.uid, queue=kw.pop("queue", "local_appliance"),
                           source="local", message_id=kw.pop("message_id", None))
    for k, v in kw.items():
        setattr(job, k, v)
    assert table.add(job, body(key))
    return job


def test_made_private_in_wal_mode_with_its_schema_version(home, table):
    mode = stat.S_IMODE(os.stat(jt.db_path(home)).st_mode)
    assert mode == 0o600
    db = sqlite3.connect(jt.db_path(home))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == jt.SCHEMA_VERSION


def test_a_newer_schema_is_refused_with_the_fix(home, table):
    table.db.execute(f"PRAGMA user_version = {jt.SCHEMA_VERSION + 1}")
    with pytest.raises(jt.TableError, match="upgrade the appliance"):
        JobTable(jt.db_path(home))


def test_a_job_life_is_recorded_and_survives_reopening(home, table):
    add(table, "k1")
    assert table.get("k1").state == "queued"
    assert table.started("k1", "slot-0")
    assert not table.started("k1", "slot-1")  # already running: a second claim does not take it
    assert table.ended("k1", "failed", cls="user", exit_code=3, peak_memory_bytes=10 << 20, cpu_seconds=1.5)
    assert not table.ended("k1", "done")  # finished jobs never change
    table.close()
    again = JobTable(jt.db_path(home))
    job = again.get("k1")
    assert (job.state, job.class_, job.exit_code, job.slot, job.attempts) == ("failed", "user", 3, "slot-0", 1)
    assert job.started <= job.ended
    again.close()


def test_a_job_given_back_waits_again_and_counts_its_attempts(table):
    add(table, "k1")
    table.started("k1", "slot-0")
    assert table.given_back("k1", "drained")
    assert table.get("k1").state == "queued"
    table.started("k1", "slot-1")
    assert table.get("k1").attempts == 2


def test_cancel_of_waiting_and_running_jobs(table):
    add(table, "q")
    add(table, "h")
    add(table, "r")
    table.hold("h")
    table.started("r", "slot-0")
    assert table.cancel("q") == "queued"
    assert table.cancel("h") == "held"
    assert table.cancel("r") == "running"
    assert table.get("q").state == table.get("h").state == "cancelled"
    assert not table.started("q", "slot-0")  # a cancelled job never starts
    assert table.get("r").state == "running" and table.cancel_requested("r")
    assert table.cancel("q") is None


def test_two_processes_write_at_once_and_lose_nothing(home, table):
    code = ("import sys; from appliance.jobs.table import JobTable, Job\n"
            "t = JobTable(sys.argv[1])\n"
            "for i in range(200): t.add(Job(key=f'{sys.argv[2]}{i}', state='queued'))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(jt.db_path(home)), p]) for p in "ab"]
    assert [p.wait() for p in procs] == [0, 0]
    assert len(table.active()) == 400


def test_a_member_sees_and_acts_on_their_own_jobs_only(home, table):
    add(table, "a1", ALICE)
    add(table, "b1", BOB)
    assert [j["key"] for j in control.list_jobs(ALICE, table, home)] == ["a1"]
    assert sorted(j["key"] for j in control.list_jobs(ROOT, table, home)) == ["a1", "b1"]
    with pytest.raises(control.JobError, match="no job b1 of yours"):
        control.cancel(ALICE, table, home, ["b1"])
    with pytest.raises(control.JobError, match="no job b1 of yours"):
        control.hold(ALICE, table, home, ["b1"])
    assert table.get("b1").state == "queued"
    control.cancel(ROOT, table, home, ["b1"])
    assert table.get("b1").state == "cancelled"
    with pytest.raises(control.JobError):
        control.history(ALICE, table, owner="bob")
    assert [j["key"] for j in control.history(BOB, table)] == ["b1"]
    assert control.history(ALICE, table) == []


def test_hold_release_and_where_a_job_stands(home, table):
    home.plan_file.parent.mkdir()
    home.plan_file.write_text(json.dumps({"slots": [{"name": "slot-0", "gpus": []}]}))
    add(table, "r", BOB)
    table.started("r", "slot-0")
    add(table, "a1", submitted=1.0)
    add(table, "a2", submitted=2.0)
    control.hold(ALICE, table, home, ["a1"])
    rows = {j["key"]: j for j in control.list_jobs(ALICE, table, home)}
    assert rows["a1"]["why"] == "held (appliance release a1)"
    assert rows["a2"]["why"] == "1st in local_appliance; slot-0 busy"
    control.release(ALICE, table, home, ["a1"])
    rows = {j["key"]: j for j in control.list_jobs(ALICE, table, home)}
    assert rows["a1"]["why"] == "1st in local_appliance; slot-0 busy"
    assert rows["a2"]["why"] == "2nd in local_appliance; slot-0 busy"


def test_an_array_is_waited_on_by_its_base_key(home, table):
    for i in range(3):
        job = job_from_request(body(f"B-{i}", {"APPLIANCE_ARRAY_BASE": "B", "APPLIANCE_ARRAY_INDEX": str(i),
                                                "APPLIANCE_ARRAY_LIMIT": "2"}),
                               owner_uid=ALICE.uid, queue="local_appliance", source="local")
        assert (job.array_base, job.array_index, job.array_limit) == ("B", i, 2)
        table.add(job)
    assert control.wait_codes(ALICE, table, home, ["B"]) == {"B": None}
    for i in range(3):
        table.started(f"B-{i}", "slot-0")
        table.ended(f"B-{i}", "done", exit_code=0)
    assert control.wait_codes(ALICE, table, home, ["B", "B-1"]) == {"B": 0, "B-1": 0}
    with pytest.raises(control.JobError):
        control.wait_codes(BOB, table, home, ["B"])


def test_requeue_runs_the_same_request_under_a_new_key(home, table):
    add(table, "k")
    table.started("k", "slot-0")
    table.ended("k", "failed", cls="user", exit_code=1)
    sent = []
    out = control.requeue(ALICE, table, home, "k", lambda q, b: sent.append((q, b)) or "m1")
    assert out == {"key": "k.r2", "requeued_from": "k", "queue": "local_appliance"}
    data = json.loads(sent[0][1])
    assert data["experiment"]["key"] == "k.r2"
    assert data["experiment"]["artifacts"]["output"]["key"] == "experiments/k.r2/output.tar"
    row = table.get("k.r2")
    assert (row.state, row.requeued_from, row.owner_uid) == ("queued", "k", ALICE.uid)
    with pytest.raises(control.JobError, match="finished"):
        control.requeue(ALICE, table, home, "k.r2", lambda q, b: "m2")
    with pytest.raises(control.JobError, match="no job k of yours"):
        control.requeue(BOB, table, home, "k", lambda q, b: "m3")


def test_a_message_in_a_queue_folder_gets_a_row_owned_by_the_file_owner(home, table):
    q = home.queue_root / "local_appliance"
    q.mkdir()
    (q / "m-1").write_bytes(body("from-client"))
    (q / "m-2").write_bytes(b"not json")
    os.chown(q / "m-1", 1234, 0)
    assert scan_local_queues(table, home.queue_root) == 1
    assert scan_local_queues(table, home.queue_root) == 0
    job = table.get("from-client")
    assert (job.owner_uid, job.queue, job.message_id, job.state) == (1234, "local_appliance", "m-1", "queued")


@pytest.mark.parametrize("raw", [b"", b"[]", b'{"experiment": {"key": 5}}', b'{"experiment": {"key": "a\\nb"}}',
                                 b'{"experiment": {"key": "' + b"x" * 300 + b'"}}'])
def test_a_request_without_a_usable_key_gets_no_row(raw):
    assert job_from_request(raw, owner_uid=1, queue="q", source="local") is None


# ---------------------------------------------------------------------------- the runner's side

def claimed(key, tmp_path, env=None, attempt=1, uid=None):
    """A claimed local message as the local queue hands it over (its file in .claimed)."""
    path = tmp_path / f"m-{key}"
    path.write_bytes(body(key, env))
    if uid is not None:
        os.chown(path, uid, 0)
    return SimpleNamespace(source="local", queue="local_appliance", message_id=f"m-{key}", body=path.read_bytes(),
                           handle=path, attempt=attempt)


def test_a_claim_starts_a_queued_job_and_records_its_owner_from_the_file(home, tmp_path):
    from appliance.jobs.record import RunnerRecord

    rec = RunnerRecord(home, "slot-0")
    assert rec.claim(claimed("k", tmp_path, uid=4321), "k") == "run"
    row = rec.table.get("k")
    assert (row.state, row.slot, row.owner_uid, row.attempts) == ("running", "slot-0", 4321, 1)
    assert row.started is not None and row.submitted is not None
    assert rec.table.request_body("k")[1] == body("k")  # kept: `requeue` can run it again
    rec.ended("k", "failed", "user", 3, "exit code 3", {"cpu_seconds": 0.5, "peak_memory_bytes": 1 << 20,
                                                          "wall_seconds": 2.0})
    row = rec.table.get("k")
    assert (row.state, row.exit_code, row.cpu_seconds, row.peak_memory_bytes) == ("failed", 3, 0.5, 1 << 20)
    rec.close()


def test_a_claim_of_a_held_or_cancelled_job_does_not_start_it(home, table, tmp_path):
    from appliance.jobs.record import RunnerRecord

    add(table, "h")
    add(table, "c")
    table.hold("h")
    table.cancel("c")
    rec = RunnerRecord(home, "slot-0")
    assert rec.claim(claimed("h", tmp_path), "h") == "held"
    assert rec.claim(claimed("c", tmp_path), "c") == "cancelled"
    assert table.get("h").state == "held" and table.get("c").state == "cancelled"
    table.release("h")
    assert rec.claim(claimed("h", tmp_path), "h") == "run"


def test_another_accounts_message_cannot_take_over_a_key_but_its_owners_copy_is_the_ledgers(home, tmp_path):
    """A member's message reusing another member's key is dead-lettered ("duplicate"); the same
    owner's request coming back under another message id (a copy, a redelivery) goes on, so the
    exactly-once ledger settles it as it ended."""
    from appliance.jobs.record import RunnerRecord

    def message(name, uid):
        msg = claimed("k", tmp_path, uid=uid)
        msg.handle = msg.handle.rename(tmp_path / name)
        msg.message_id = name
        return msg

    rec = RunnerRecord(home, "slot-0")
    assert rec.claim(message("first", 4321), "k") == "run"
    rec.ended("k", "success", "success", 0)
    assert rec.claim(message("theirs", 9876), "k") == "duplicate"
    assert rec.claim(message("again", 4321), "k") == "run"
    assert rec.table.get("k").owner_uid == 4321
    rec.close()


def test_an_array_runs_at_most_its_bound_at_once(home, tmp_path):
    from appliance.jobs.record import RunnerRecord

    env = lambda i: {"APPLIANCE_ARRAY_BASE": "B", "APPLIANCE_ARRAY_INDEX": str(i), "APPLIANCE_ARRAY_LIMIT": "2"}
    recs = [RunnerRecord(home, f"slot-{i}") for i in range(3)]
    assert recs[0].claim(claimed("B-0", tmp_path, env(0)), "B-0") == "run"
    assert recs[1].claim(claimed("B-1", tmp_path, env(1)), "B-1") == "run"
    assert recs[2].claim(claimed("B-2", tmp_path, env(2)), "B-2") == "held"
    recs[0].ended("B-0", "success", "success", 0)
    assert recs[2].claim(claimed("B-2", tmp_path, env(2)), "B-2") == "run"


def test_a_running_job_sees_its_cancel(home, table, tmp_path):
    from appliance.jobs.record import RunnerRecord

    rec = RunnerRecord(home, "slot-0", poll_s=0.0)
    assert rec.claim(claimed("r", tmp_path), "r") == "run"
    assert not rec.cancel_requested("r")
    control.cancel(ROOT, table, home, ["r"])
    assert rec.cancel_requested("r")
    rec.ended("r", "cancelled", "cancelled", -15)
    assert table.get("r").state == "cancelled"
    assert control.wait_codes(ROOT, table, home, ["r"]) == {"r": 143}


def test_a_job_cancelled_while_its_runner_was_gone_is_not_run_again(home, table, tmp_path):
    from appliance.jobs.record import RunnerRecord

    rec = RunnerRecord(home, "slot-0")
    assert rec.claim(claimed("r", tmp_path), "r") == "run"
    assert rec.claim(claimed("r", tmp_path, attempt=2), "r") == "run"  # its runner died: runs again
    assert table.get("r").attempts == 2
    control.cancel(ROOT, table, home, ["r"])  # ... and the runner dies again before it sees this
    assert rec.claim(claimed("r", tmp_path, attempt=3), "r") == "cancelled"
    assert table.get("r").state == "cancelled"


def test_a_broken_table_never_stops_a_claim(tmp_path):
    from appliance.jobs.record import RunnerRecord

    bad = SimpleNamespace(root=tmp_path / "no" / "such" / "folder")
    rec = RunnerRecord(bad, "slot-0")
    assert rec.claim(claimed("k", tmp_path), "k") == "run"
    assert not rec.cancel_requested("k")
    rec.ended("k", "success", "success", 0)


def test_a_message_dead_lettered_before_it_ran_ends_failed_with_the_reason(home, table):
    from appliance.jobs.intake import note_dead_letters

    q = home.queue_root / "local_appliance"
    q.mkdir()
    (q / "m-1").write_bytes(body("bad"))
    scan_local_queues(table, home.queue_root)
    assert note_dead_letters(table, home.queue_root) == 0  # still waiting
    dead = home.queue_root / ".dead" / "local_appliance"
    dead.mkdir(parents=True)
    (q / "m-1").rename(dead / "m-1")
    (dead / "m-1.reason").write_text("no slot of this appliance can run it: needs 2 GPUs\n")
    assert note_dead_letters(table, home.queue_root) == 1
    job = table.get("bad")
    assert (job.state, job.class_) == ("failed", "unrunnable")
    assert job.reason == "dead-lettered: no slot of this appliance can run it: needs 2 GPUs"
    assert control.wait_codes(ROOT, table, home, ["bad"]) == {"bad": 125}


def test_a_members_one_job_goes_before_another_members_many(home, table, tmp_path):
    """Fair share at the claim: the local queue hands out the job the table's order puts first."""
    from appliance.jobs.record import RunnerRecord
    from appliance.queues.local import LocalQueueSource, enqueue

    for i in range(40):  # alice's many, first in the folder
        mid = enqueue(home.queue_root, "local_appliance", body(f"a{i}"))
        os.utime(home.queue_root / "local_appliance" / mid, (1000 + i, 1000 + i))
        os.chown(home.queue_root / "local_appliance" / mid, ALICE.uid, 0)
    mid = enqueue(home.queue_root, "local_appliance", body("b0"))
    os.chown(home.queue_root / "local_appliance" / mid, BOB.uid, 0)
    rec = RunnerRecord(home, "slot-0")
    src = LocalQueueSource(home.queue_root)
    keys = []
    for _ in range(3):
        scan_local_queues(table, home.queue_root)
        msg = src.claim("local_appliance", prefer=rec.fair_first("local_appliance"))
        key = json.loads(msg.body)["experiment"]["key"]
        assert rec.claim(msg, key) == "run"
        keys.append(key)
        rec.ended(key, "success", "success", 0)
        src.ack(msg)
    assert keys == ["a0", "b0", "a1"]


def test_a_second_message_with_a_known_key_does_not_take_over_its_row(home, table, tmp_path):
    from appliance.jobs.record import RunnerRecord

    add(table, "k", ALICE, message_id="m-k")
    rec = RunnerRecord(home, "slot-0")
    other = claimed("k", tmp_path, uid=BOB.uid)
    other.message_id = "m-other"
    assert rec.claim(other, "k") == "duplicate"
    assert table.get("k").state == "queued"
    assert rec.claim(claimed("k", tmp_path), "k") == "run"


def test_a_job_queued_for_a_caller_is_theirs_though_root_writes_its_file(home, table):
    from appliance.queues.local import enqueue

    put = lambda queue, b: enqueue(home.queue_root, queue, b)  # noqa: E731 - as the API (root) writes it
    assert control.queued(table, body("s1"), owner_uid=ALICE.uid, queue="local_appliance", enqueue=put) == "s1"
    control.refresh(table, home)  # a scan of the folder does not make root its owner
    assert table.get("s1").owner_uid == ALICE.uid and table.get("s1").message_id
    assert [j["key"] for j in control.list_jobs(ALICE, table, home)] == ["s1"]
    with pytest.raises(control.JobError, match="already a job"):
        control.queued(table, body("s1"), owner_uid=BOB.uid, queue="local_appliance", enqueue=put)
    assert len(list((home.queue_root / "local_appliance").iterdir())) == 1


def test_requests_of_long_finished_jobs_are_forgotten_their_rows_kept(table):
    add(table, "old")
    add(table, "new")
    add(table, "waiting")
    table.ended("old", "done", now=1000.0)
    table.ended("new", "done")
    assert table.forget_requests(5000.0) == 1
    assert table.request_body("old") is None and table.get("old").state == "done"
    assert table.request_body("new") and table.request_body("waiting")


def test_status_and_metrics_count_the_waiting_held_and_running_jobs(tmp_path):
    from appliance.jobs.table import active_counts
    from appliance.metrics import Collector
    from appliance.paths import Home
    from appliance.status import format_status, gather

    home = Home.at(tmp_path / "home")
    home.ensure()
    assert active_counts(home) is None and gather(home)["jobs"] is None  # no table yet
    table = JobTable.of(home)
    for key in ("q1", "q2", "h", "r"):
        add(table, key)
    table.hold("h")
    table.started("r", "slot-0")
    table.close()
    assert active_counts(home) == {"queued": 2, "held": 1, "running": 1}
    facts = gather(home)
    assert facts["jobs"] == {"queued": 2, "held": 1, "running": 1}
    assert "jobs: 2 queued, 1 held, 1 running" in format_status(facts)
    [family] = [f for f in Collector(home).collect() if f.name == "appliance_jobs"]
    assert {s.labels["state"]: s.value for s in family.samples} == {"queued": 2, "held": 1, "running": 1}
    assert facts["finished_last_hour"] == {"done": 0, "failed": 0, "cancelled": 0}
    table = JobTable.of(home)
    for key, state, ago in (("d1", "done", 60), ("d2", "done", 600), ("f", "failed", 30), ("old", "done", 7200)):
        add(table, key)
        table.started(key, "slot-0")
        assert table.ended(key, state, now=time.time() - ago)
    table.cancel("q1")
    table.close()
    facts = gather(home)
    assert facts["finished_last_hour"] == {"done": 2, "failed": 1, "cancelled": 1}  # not the one 2 hours ago
    assert "in the last hour: 2 done, 1 failed, 1 cancelled (`appliance history` lists them)" in format_status(facts)


def test_an_older_homes_table_moves_into_the_jobs_folder_with_what_its_log_holds(home):
    """Homes made before the table had a folder kept it as HOME/jobs.db: its rows, even those
    still only in its -wal (a process has it open), are there at the new place, root's alone."""
    old = JobTable(home.root / "jobs.db")
    add(old, "before-the-move")
    assert (home.root / "jobs.db-wal").stat().st_size > 0  # committed, not yet checkpointed
    moved = JobTable.of(home)
    try:
        assert moved.path == home.root / "jobs" / "jobs.db"
        assert moved.get("before-the-move").state == "queued"
        assert not any((home.root / ("jobs.db" + s)).exists() for s in ("", "-wal", "-shm"))
        assert stat.S_IMODE(os.stat(home.root / "jobs").st_mode) == 0o700
        add(old, "written-by-the-old-connection")  # a process that had it open goes on, same file
        assert moved.get("written-by-the-old-connection") is not None
    finally:
        old.close()
        moved.close()


def test_a_new_home_makes_its_table_in_the_jobs_folder(home):
    assert not (home.root / "jobs").exists()
    table = JobTable.of(home)
    table.close()
    assert (home.root / "jobs" / "jobs.db").is_file() and not (home.root / "jobs.db").exists()
    assert stat.S_IMODE(os.stat(home.root / "jobs").st_mode) == 0o700


def test_up_moves_an_older_homes_table_before_any_runner_opens_it(tmp_path):
    """`up` (lifecycle.prepare) moves it: a slot's container sees only the jobs folder, so a
    runner there would otherwise start a new, empty table beside the old one."""
    from appliance.lifecycle import prepare
    from appliance.paths import Home

    h = Home.at(tmp_path / "home")
    h.root.mkdir()
    old = JobTable(h.root / "jobs.db")
    add(old, "from-before-the-upgrade")
    old.close()
    prepare(h)
    assert not (h.root / "jobs.db").exists()
    table = JobTable(h.jobs_dir / "jobs.db")
    try:
        assert table.get("from-before-the-upgrade").state == "queued"
    finally:
        table.close()


def test_doctor_finds_a_job_table_or_ledger_opened_to_others_and_names_the_fix(tmp_path):
    from appliance.doctor import check
    from appliance.paths import Home

    h = Home.at(tmp_path / "home")
    h.ensure()
    h.config_file.write_text("")
    JobTable.of(h).close()
    records = lambda: [f for f in check(h) if f.what == "records"]  # noqa: E731
    (finding,) = records()
    assert finding.ok, finding
    os.chmod(h.jobs_dir / "jobs.db", 0o644)
    os.chmod(h.ledger_dir, 0o755)
    (finding,) = records()
    assert not finding.ok
    assert str(h.jobs_dir / "jobs.db") in finding.detail and str(h.ledger_dir) in finding.detail
    assert "chmod go=" in finding.detail
