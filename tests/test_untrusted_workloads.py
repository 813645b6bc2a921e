"""Every request is untrusted code: what a hostile workload can and cannot reach, and finished
work that is never run twice. Real store, real runner, real processes (as root: workloads then
run as the slot's own unprivileged account)."""

from __future__ import annotations

import json
import os
import pwd
import signal

import pytest

from appliance.runner.status import read_status
from tests.realparts import need
from tests.test_runner_loop import (Q, claimed, dead_reasons, make_runner, output_of, pending, read_artifact,
                                    request, scratch, start_runner, submit, wait_for)
from tests.test_runner_loop import home as home  # noqa: F401  (the fixture)


@pytest.fixture(autouse=True)
def _as_root():
    need(os.geteuid() == 0, "root (workloads are switched to an unprivileged account)")


PROBE = """
import json, os, sys
home, runner = sys.argv[1], os.getppid()
def attempt(what, fn):
    try:
        fn()
        return "allowed"
    except OSError as e:
        return type(e).__name__
report = {
    "uid": os.getuid(), "euid": os.geteuid(), "groups": os.getgroups(),
    "read secrets": attempt("", lambda: open(os.path.join(home, "secrets", "store.json")).read()),
    "read shadow": attempt("", lambda: open("/etc/shadow").read()),
    "signal runner": attempt("", lambda: os.kill(runner, 0)),
    "runner environ": attempt("", lambda: open(f"/proc/{runner}/environ").read()),
    "host shm": attempt("", lambda: os.listdir("/proc/1/root/dev/shm")),
    "runner root": attempt("", lambda: os.listdir(f"/proc/{runner}/root/")),
    "write status": attempt("", lambda: open(os.path.join(home, "status", "forged.json"), "w").write("{}")),
    "write cache": attempt("", lambda: open(os.path.join(home, "cache", "planted"), "w").write("x")),
    "read queue": attempt("", lambda: os.listdir(os.path.join(home, "studioml", "queue", "local_test"))),
    "read cached workspaces": attempt("", lambda: os.listdir(os.path.join(home, "cache", "artifacts"))),
    "read broker passwords": attempt("", lambda: os.listdir(os.path.join(home, "credentials"))),
    "read logs": attempt("", lambda: os.listdir(os.path.join(home, "logs"))),
    "read job table": attempt("", lambda: open(os.path.join(home, "jobs", "jobs.db"), "rb").read()),
    "read ledger": attempt("", lambda: os.listdir(os.path.join(home, "ledger"))),
    "write own workspace": attempt("", lambda: open("mine.txt", "w").write("ok")),
}
print("REPORT " + json.dumps(report))
"""


def _report(out: str) -> dict:
    line = next(ln for ln in out.splitlines() if ln.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def test_a_workload_is_an_unprivileged_account_of_its_slot_and_reaches_nothing_of_the_appliance(store, home):
    (home.secrets_dir / "store.json").write_text('{"secret_key": "the admin key"}')
    os.chmod(home.secrets_dir / "store.json", 0o600)
    from appliance.queues.local import share_queue_tree
    share_queue_tree(home.studioml_home)  # as `appliance up` leaves it
    key, body = request(store, {"train.py": PROBE}, args=[str(home.root)])
    submit(home, body)
    runner, _ = make_runner(home, slot="slot-0")
    assert runner.run_once()
    out = output_of(store, key)
    report = _report(out)
    account = pwd.getpwnam("appliance-slot-0")
    assert report["uid"] == report["euid"] == account.pw_uid != 0
    assert report["groups"] == []
    for what in ("read secrets", "read shadow", "signal runner", "runner environ", "host shm", "runner root",
                 "write status", "write cache", "read queue", "read cached workspaces", "read broker passwords",
                 "read logs", "read job table", "read ledger"):
        assert report[what] != "allowed", (what, report)
    assert report["write own workspace"] == "allowed"
    assert "the admin key" not in out


def test_two_slots_run_as_two_accounts(store, home):
    uids = []
    for slot in ("slot-0", "slot-1"):
        key, body = request(store, {"train.py": PROBE}, args=[str(home.root)])
        submit(home, body)
        runner, _ = make_runner(home, slot=slot)
        assert runner.run_once()
        uids.append(_report(output_of(store, key))["uid"])
    assert uids[0] != uids[1] and 0 not in uids


def test_root_only_when_asked_for(store, home):
    key, body = request(store, {"train.py": PROBE}, args=[str(home.root)])
    submit(home, body)
    runner, _ = make_runner(home, workload_user="root")
    assert runner.run_once()
    assert _report(output_of(store, key))["uid"] == 0


def test_a_link_planted_in_an_output_folder_is_not_followed_by_the_root_runner(store, home):
    """The workload makes its modeldir point at the appliance's secrets (a symlink, a hard link,
    a folder swapped for a link): the upload must not carry the runner's files."""
    (home.secrets_dir / "store.json").write_text('{"secret_key": "the admin key"}')
    os.chmod(home.secrets_dir / "store.json", 0o600)
    key, body = request(store, {"train.py": f"""
        import os
        os.symlink({str(home.secrets_dir / 'store.json')!r}, "../modeldir/link.json")
        os.symlink({str(home.secrets_dir)!r}, "../modeldir/secrets")
        try:
            os.link({str(home.secrets_dir / 'store.json')!r}, "../modeldir/hard.json")
        except OSError as e:
            print("hard link refused", e)
        open("../modeldir/mine.txt", "w").write("mine")
        """})
    submit(home, body)
    runner, _ = make_runner(home)
    assert runner.run_once()
    files = read_artifact(store, key, "modeldir")
    assert files.get("mine.txt") == b"mine"
    assert all(b"the admin key" not in data for data in files.values())


def test_finished_work_is_not_run_again_when_the_same_request_comes_back(store, home):
    """A redelivered message (broker restart, a lost ack) whose job is complete in the store is
    settled from the result record, not run."""
    runs = scratch(home) / "runs"
    key, body = request(store, {"train.py": f"""
        open({str(runs)!r}, "a").write("ran\\n")
        print("done")
        """})
    submit(home, body)
    runner, _ = make_runner(home)
    assert runner.run_once()
    submit(home, body)  # the same request again: settled from the ledger when claimed, not run
    runner.run_once()
    assert runs.read_text() == "ran\n"
    assert pending(home) == [] and claimed(home) == [] and dead_reasons(home) == []
    assert runner.status.data["last_result"]["reason"].startswith("already ran")


def test_sigkill_while_uploading_resumes_the_upload_and_never_reruns(store, home):
    runs = scratch(home) / "runs"
    key, body = request(store, {"train.py": f"""
        import os
        open({str(runs)!r}, "a").write("ran\\n")
        with open("../modeldir/weights.bin", "wb") as f:
            for _ in range(48):
                f.write(os.urandom(1 << 20))
        print("trained")
        """})
    submit(home, body)
    first = start_runner(home, "slot-u")
    try:
        wait_for(lambda: (read_status(home, "slot-u") or {}).get("state") == "uploading", "the upload",
                 timeout=300)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
        first.wait()
    second = start_runner(home, "slot-u")
    try:
        wait_for(lambda: pending(home) == [] and claimed(home) == [], "the message to settle", timeout=300)
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        second.kill()
        second.wait()
    assert runs.read_text() == "ran\n"
    assert dead_reasons(home) == []
    assert "trained" in output_of(store, key)
    assert len(read_artifact(store, key, "modeldir")["weights.bin"]) == 48 << 20


def test_a_poison_message_is_quarantined_after_max_attempts(store, home):
    """A message whose every claim ends with its runner dead is dead-lettered on the claim after
    runner.max_attempts, with the reason, instead of crash-looping the slot."""
    from appliance.queues.base import Claimed
    from appliance.queues.base import over_attempts

    msg = Claimed(source="local", queue=Q, message_id="m", body=b"{}", attempt=4)
    assert "runner.max_attempts = 3" in over_attempts(msg, 3)
    assert over_attempts(Claimed(source="local", queue=Q, message_id="m", body=b"{}", attempt=3), 3) is None


def _zero_bomb(size: int) -> bytes:
    """A .tar.gz whose one member is `size` bytes of zeros (a few MB compressed)."""
    import io
    import tarfile
    import zlib

    header = tarfile.TarInfo("zeros.bin")
    header.size = size
    raw = io.BytesIO()
    gz = zlib.compressobj(1, zlib.DEFLATED, 31)
    raw.write(gz.compress(header.tobuf(format=tarfile.GNU_FORMAT)))
    block = bytes(1 << 20)
    for _ in range(size >> 20):
        raw.write(gz.compress(block))
    raw.write(gz.compress(bytes(1024)))  # end of archive
    raw.write(gz.flush())
    return raw.getvalue()


def test_a_workspace_that_unpacks_past_the_request_s_disk_is_refused(store, home):
    """A small gzip of more zeros than the request's `hdd` (1gb here) is cut off, with the reason,
    however large runner.max_unpack is."""
    key, body = request(store, {"train.py": "print('never')"})
    blob = json.loads(body)["experiment"]["artifacts"]["workspace"]["key"]
    store.client().put_object(Bucket=store.bucket, Key=blob, Body=_zero_bomb((1 << 30) + (64 << 20)))
    submit(home, body)
    runner, _ = make_runner(home, max_unpack_bytes=20 << 30)
    assert runner.run_once()
    [reason] = dead_reasons(home)
    assert "more than" in reason and "zeros.bin" in reason
    assert not list((home.work_dir / "slot-0").glob("*/workspace/zeros.bin"))


def test_the_request_s_disk_bounds_all_its_artifacts_together(store, home):
    """`hdd` bounds everything the job unpacks, not each artifact: two data artifacts of 5 MiB
    each fit an 8mb request one by one, not together."""
    key, body = request(store, {"train.py": "print('never')"})
    raw = json.loads(body)
    raw["experiment"]["resources_needed"]["hdd"] = "8mb"
    workspace = raw["experiment"]["artifacts"]["workspace"]
    for name in ("data1", "data2"):
        blob = f"blobstore/{name}-{key}.tar.gz"
        store.client().put_object(Bucket=store.bucket, Key=blob, Body=_zero_bomb(5 << 20))
        raw["experiment"]["artifacts"][name] = dict(workspace, key=blob, local=f"/home/user/{name}")
    submit(home, json.dumps(raw).encode())
    runner, _ = make_runner(home, max_unpack_bytes=20 << 30)
    assert runner.run_once()
    [reason] = dead_reasons(home)
    assert "more than" in reason and "in all" in reason and "class: user" in reason, reason
    unpacked = sum(f.stat().st_size for f in (home.work_dir / "slot-0").rglob("zeros.bin"))
    assert unpacked <= 8 * 10**6


def test_a_full_disk_costs_a_bounded_number_of_tries_and_never_the_runner(store, home):
    """The job's disk fills up: an infrastructure failure of that job, put back and tried again
    up to runner.max_attempts, then dead-lettered saying the disk is full; the runner lives on."""
    import subprocess

    work = home.work_dir
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(work)], check=True)
    try:
        key, body = request(store, {"train.py": """
            with open("../modeldir/fill.bin", "wb") as f:
                while True:
                    f.write(bytes(1 << 20))
            """})
        raw = json.loads(body)
        raw["experiment"]["resources_needed"]["hdd"] = "16mb"  # fits the disk when it starts
        submit(home, json.dumps(raw).encode())
        runner, _ = make_runner(home, max_attempts=3)
        for _ in range(3):
            assert runner.run_once()  # never raises: the runner does not die of it
        [reason] = dead_reasons(home)
        assert "the disk is full" in reason and "3 times" in reason
        assert pending(home) == [] and claimed(home) == []
    finally:
        subprocess.run(["umount", "-l", str(work)], check=False)


def test_a_disk_full_at_settle_holds_the_finished_job_and_never_runs_it_again(store, tmp_path):
    """The disk fills to its last byte while a job finishes: the runner lives, holds the finished
    job and its message (status says why), and once space returns records, uploads and acks it:
    it ran once."""
    import subprocess
    import threading

    from appliance.paths import Home
    from appliance.status import disk_problem, format_status, gather
    from tests.realparts import full_filesystem

    root = tmp_path / "small"
    root.mkdir()
    root.chmod(0o755)
    with full_filesystem(root, "64m") as disk:
        disk.free()  # empty to start with; filled below, mid-job
        home = Home.at(root / "home")
        home.ensure()
        marks = tmp_path / "marks"
        marks.mkdir(mode=0o1777)
        marks.chmod(0o1777)
        key, body = request(store, {"train.py": f"""
            import os, time
            open({str(marks / 'runs')!r}, "a").write("ran\\n")
            print("working", flush=True)
            open({str(marks / 'ready')!r}, "w").close()
            while not os.path.exists({str(marks / 'go')!r}):
                time.sleep(0.05)
            """})
        raw = json.loads(body)
        raw["experiment"]["resources_needed"]["hdd"] = "16mb"  # fits the small disk when it starts
        submit(home, json.dumps(raw).encode())
        runner, _ = make_runner(home)
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(ran=runner.run_once()), daemon=True)
        thread.start()
        wait_for(lambda: (marks / "ready").exists() or not thread.is_alive(), "the workload to start", timeout=120)
        assert (marks / "ready").exists(), dead_reasons(home)
        disk.fill()
        (marks / "go").touch()
        wait_for(lambda: "disk full" in (runner.status.data.get("held") or ""), "the job to be held", timeout=60)
        assert thread.is_alive() and claimed(home) != []  # held, not released: it will not run again
        assert "disk full" in disk_problem(home) and "disk full" in format_status(gather(home))
        disk.free()
        thread.join(120)
        assert not thread.is_alive() and outcome.get("ran")
        assert (marks / "runs").read_text() == "ran\n"
        assert pending(home) == [] and claimed(home) == [] and dead_reasons(home) == []
        assert "working" in output_of(store, key)
        assert not runner.status.data.get("held") and runner.status.unwritten is None
        subprocess.run(["sync"], check=False)
