"""How fast the job table answers `jobs` and `history` with 100,000 rows, and what recording
one state change costs, each beside a baseline in the same run.

    sudo .venv/bin/python bench/bench_jobs.py [--rows 100000] [--n 30]

It fills a fresh table (a temp folder) with ROWS jobs of 50 owners: all but ~1% finished
(done, failed, cancelled), 600 queued (their messages in the local queue folder), 100 held,
8 running; then times, N times each:
  - jobs:         appliance/jobs/control.list_jobs as an admin (every waiting job placed in
                  fair-share order with its reason) and as one member
  - history:      control.history as an admin (latest 100), one member's, --state failed,
                  --since an hour ago
  - sqlite3 CLI:  the baseline: the `sqlite3` program running the same SELECTs on the same
                  file (a fresh process each time, so it includes its start: ~1-2 ms)
  - state change: table.started + table.ended of a queued job (two changes, one commit each),
                  what a runner adds to a job's start, RunnerRecord.claim (read the row, the
                  array bound, queued -> running), and the fair-share order it asks for on each
                  claim pass of a local queue where several owners wait (50 owners, 600 waiting)
                  beside the runner's existing per-step cost, an atomic status-file write
                  (appliance/files.write_atomic, as runner/status.py does at every step)
  - the whole command: `appliance jobs --json` and `history --json` as processes (root with no
                  API running answers from the table in-process) beside `appliance jobs --help`
                  (the interpreter's start and the imports, no query)
It prints the median and p90 of each in milliseconds. Goals: jobs and history ≤ 100 ms; a state
change ≤ 1 ms.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.files import write_atomic  # noqa: E402
from appliance.jobs import control  # noqa: E402
from appliance.jobs.table import _COLUMNS, _SQL_COLUMNS, Job, JobTable  # noqa: E402

OWNERS = [1000 + i for i in range(50)]


def fill(table: JobTable, rows: int) -> None:
    rnd = random.Random(7)
    now = time.time()
    active = {"queued": 600, "held": 100, "running": 8}
    finished = rows - sum(active.values())
    table.db.execute("BEGIN")
    i = 0
    for state, count in [("finished", finished), *active.items()]:
        for _ in range(count):
            owner = rnd.choice(OWNERS)
            submitted = now - (rows - i) * 5
            job = Job(key=f"{int(submitted)}_{i:08x}", state=state, owner_uid=owner, owner=f"u{owner}",
                      queue="local_appliance", source="local", message_id=f"m{i}", submitted=submitted,
                      attempts=1)
            if state == "finished":
                job.state = rnd.choices(["done", "failed", "cancelled"], [90, 8, 2])[0]
                job.started, job.ended = submitted + 1, submitted + 1 + rnd.random() * 600
                job.slot, job.exit_code = f"slot-{i % 8}", 0 if job.state == "done" else 1
                job.class_ = {"done": "success", "failed": "user", "cancelled": "cancelled"}[job.state]
                job.cpu_seconds, job.peak_memory_bytes = rnd.random() * 100, rnd.randrange(1 << 30)
            elif state == "running":
                job.started, job.slot = now - 10, f"slot-{i % 8}"
            values = [getattr(job, c) for c in _COLUMNS]
            table.db.execute(f"INSERT INTO jobs ({_SQL_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)
            i += 1
    table.db.execute("COMMIT")
    table.db.execute("ANALYZE")


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def show(name: str, ms: list[float]) -> None:
    ms = sorted(ms)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    print(f"  {name:<46} median {statistics.median(ms):8.3f} ms   p90 {p90:8.3f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--n", type=int, default=30)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    try:
        home = SimpleNamespace(root=tmp, queue_root=tmp / "queue", plan_file=tmp / "plan.json")
        home.queue_root.mkdir()
        home.plan_file.write_text('{"slots": [' + ", ".join(f'{{"name": "slot-{i}", "gpus": []}}' for i in range(8))
                                  + "]}")
        table = JobTable(tmp / "jobs.db")
        t = time.perf_counter()
        fill(table, a.rows)
        folder = home.queue_root / "local_appliance"  # the waiting jobs' messages, as a runner sees them
        folder.mkdir()
        for key, queue, message_id in table.queued_local():
            (folder / message_id).write_text("{}")
        print(f"{a.rows} rows filled in {time.perf_counter() - t:.1f} s ({(tmp / 'jobs.db').stat().st_size >> 20} MiB)")
        admin = SimpleNamespace(uid=0, name="root", admin=True)
        member = SimpleNamespace(uid=OWNERS[3], name="m", admin=False)
        hour = time.time() - 3600

        print("jobs and history (in the API process, over the open table):")
        show("jobs (admin, 708 active, fair-share order)", timed(lambda: control.list_jobs(admin, table, home), a.n))
        show("jobs (one member)", timed(lambda: control.list_jobs(member, table, home), a.n))
        show("history (admin, latest 100)", timed(lambda: control.history(admin, table), a.n))
        show("history (one member)", timed(lambda: control.history(member, table), a.n))
        show("history --state failed", timed(lambda: control.history(admin, table, state="failed"), a.n))
        show("history --since 1h", timed(lambda: control.history(admin, table, since=hour, limit=1000), a.n))

        print("baseline: the sqlite3 CLI, same SELECTs, one process each:")
        db = str(tmp / "jobs.db")
        sqls = {
            "sqlite3: active jobs": "SELECT * FROM jobs WHERE state IN ('queued','held','running') ORDER BY queue, submitted",
            "sqlite3: history (latest 100)": "SELECT * FROM jobs WHERE state IN ('done','failed','cancelled') "
                                             "ORDER BY ended DESC LIMIT 100",
            "sqlite3: history (one member)": f"SELECT * FROM jobs WHERE state IN ('done','failed','cancelled') "
                                             f"AND owner_uid = {member.uid} ORDER BY ended DESC LIMIT 100",
        }
        if shutil.which("sqlite3"):
            for name, sql in sqls.items():
                show(name, timed(lambda: subprocess.run(["sqlite3", db, sql], stdout=subprocess.DEVNULL, check=True),
                                 a.n))
        else:
            print("  (no sqlite3 program on PATH: apt-get install sqlite3)")

        print("recording a state change:")
        keys = [j.key for j in table.active() if j.state == "queued"][: a.n * 5]

        def change():
            k = keys.pop()
            table.started(k, "slot-0")
            table.ended(k, "done", cls="success", exit_code=0, cpu_seconds=1.0, peak_memory_bytes=1)
        per_two = timed(change, min(len(keys), a.n * 5))
        show("one state change (started+ended / 2)", [x / 2 for x in per_two])
        from appliance.jobs.record import RunnerRecord

        rec = RunnerRecord(home, "slot-1")
        claims = [j for j in table.active() if j.state == "queued"][: a.n * 5]

        def claim():
            j = claims.pop()
            msg = SimpleNamespace(source="local", queue=j.queue, message_id=j.message_id, body=b"{}",
                                  handle=None, attempt=1)
            assert rec.claim(msg, j.key) == "run"
        show("a runner's claim (check + queued -> running)", timed(claim, min(len(claims), a.n * 5)))
        show("fair-share order of a queue (600 waiting, 50 owners)",
             timed(lambda: rec.fair_first("local_appliance"), a.n * 5))
        rec.close()
        status = tmp / "status.json"
        show("baseline: atomic status-file write", timed(lambda: write_atomic(status, '{"state": "running"}'),
                                                         a.n * 5))
        table.close()

        print("the whole command, a process each (root without an API reads the table in-process):")
        cli = [sys.executable, "-m", "appliance", "--home", str(tmp)]
        for name, args in (("baseline: appliance jobs --help (start, imports)", ["jobs", "--help"]),
                           ("appliance jobs --json", ["jobs", "--json"]),
                           ("appliance history --json", ["history", "--json"])):
            show(name, timed(lambda: subprocess.run(cli + args, stdout=subprocess.DEVNULL, check=True), max(5, a.n // 3)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
