"""What a caller may see and do with jobs: list, history, cancel, hold, release, requeue, wait.

Each function takes the caller (anything with `uid`, `name` and `admin`, e.g. the API's
Caller, whose uid the kernel gave), the JobTable, and plain arguments; it returns plain data
(JSON-ready dicts) or raises JobError with one line. The API's routes (appliance/api/jobs_routes.py)
and, without an API, root's CLI call these.

Owner rules: a member sees and acts on their own jobs only, an admin (root, or the admin
group) on all. Another member's job is answered as if it did not exist ("no job KEY of yours"),
so its key cannot be probed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

from appliance.jobs import policy
from appliance.jobs.intake import job_from_request, note_dead_letters, scan_local_queues
from appliance.jobs.table import CANCELLED, FINISHED, HELD, QUEUED, RUNNING, Job, JobTable


class JobError(Exception):
    """A refusal or a missing job: `status` as HTTP would say it, and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _sees(caller, job: Job) -> bool:
    return bool(caller.admin) or (job.owner_uid is not None and job.owner_uid == caller.uid)


def _own(caller, table: JobTable, key: str) -> Job:
    job = table.get(key)
    if job is None or not _sees(caller, job):
        mine = "" if caller.admin else " of yours"
        raise JobError(404, f"no job {key}{mine} on this appliance (appliance jobs; appliance history)")
    return job


def _array_of(caller, table: JobTable, key: str) -> list[Job]:
    """The members of the array whose base key is `key` that the caller may see."""
    return [j for j in table.array(key) if _sees(caller, j)]


def _targets(caller, table: JobTable, key: str) -> list[Job]:
    """A job, or every member of an array named by its base key."""
    job = table.get(key)
    if job is not None and _sees(caller, job):
        return [job]
    members = _array_of(caller, table, key)
    if members:
        return members
    return [_own(caller, table, key)]  # raises the one line


KEEP_REQUESTS_S = 30 * 86400.0  # requeue works on jobs that finished in the last 30 days
_FORGET_EVERY_S = 3600.0
_forgot_at = 0.0


def refresh(table: JobTable, home) -> None:
    """Rows for what waits in the local queue folders that the table has not seen yet, and rows
    of local messages dead-lettered before they ran; once an hour, requests kept past
    KEEP_REQUESTS_S are dropped."""
    global _forgot_at
    now = time.time()
    if now - _forgot_at > _FORGET_EVERY_S:
        _forgot_at = now
        table.forget_requests(now - KEEP_REQUESTS_S)
    present: set = set()
    scan_local_queues(table, Path(home.queue_root), present=present)
    note_dead_letters(table, Path(home.queue_root), present)


# ---------------------------------------------------------------------------- reads

def _slots(home, running: Sequence[Job]) -> list[policy.SlotView]:
    try:
        plan = json.loads(Path(home.plan_file).read_text())
        slots = plan.get("slots", [])
    except (OSError, ValueError):
        return []
    on = {j.slot: j.key for j in running if j.slot}
    return [policy.SlotView(s.get("name", "?"), len(s.get("gpus") or ()), on.get(s.get("name")))
            for s in slots if isinstance(s, dict)]


def list_jobs(caller, table: JobTable, home, everyone: bool = True) -> list[dict]:
    """Queued, held and running jobs the caller may see, each with `why` for a waiting one:
    where it stands in its queue (fair-share order, appliance/jobs/policy.py) and why it waits."""
    refresh(table, home)
    jobs = table.active()
    running = [j for j in jobs if j.state == RUNNING]
    slots = _slots(home, running)
    order: dict[str, int] = {}
    by_queue: dict[str, list[Job]] = {}
    for j in jobs:
        if j.state == QUEUED:
            by_queue.setdefault(j.queue or "", []).append(j)
    last = table.last_started_by_owner({j.owner_uid for j in jobs if j.owner_uid is not None})
    for queue, waiting in by_queue.items():
        keys = policy.fair_order([policy.Waiting(j.key, j.owner_uid, j.submitted or 0) for j in waiting], last)
        order.update({k: i + 1 for i, k in enumerate(keys)})
    array_running: dict = {}
    for j in running:
        if j.array_base:
            array_running[(j.array_base, j.owner_uid)] = array_running.get((j.array_base, j.owner_uid), 0) + 1
    out = []
    for j in jobs:
        if not _sees(caller, j) or (not everyone and j.owner_uid != caller.uid):
            continue
        row = j.to_json()
        if j.state in (QUEUED, HELD):
            row["position"] = order.get(j.key)
            row["why"] = policy.why_waiting(
                key=j.key, state=j.state, queue=j.queue or "?", position=order.get(j.key), gpus=j.gpus,
                slots=slots, array_running=array_running.get((j.array_base, j.owner_uid), 0),
                array_limit=j.array_limit, array_base=j.array_base)
        elif j.cancel_requested:
            row["why"] = "cancelling"
        out.append(row)
    out.sort(key=lambda r: ({RUNNING: 0, QUEUED: 1, HELD: 2}[r["state"]], r.get("position") or 0,
                            r.get("submitted") or 0))
    return out


def history(caller, table: JobTable, owner: Optional[str] = None, state: Optional[str] = None,
            since: Optional[float] = None, limit: int = 100) -> list[dict]:
    """Finished jobs, the latest first. A member sees their own; `owner` (a name or uid) is
    for admins, or a member naming themself."""
    if state is not None and state not in FINISHED:
        raise JobError(400, f"--state {state}: history holds {', '.join(FINISHED)} jobs "
                            f"(appliance jobs shows the others)")
    owner_uid = None if caller.admin else caller.uid
    if owner is not None:
        uid = _uid_of(owner)
        if not caller.admin and uid != caller.uid:
            raise JobError(403, f"--owner {owner}: a member sees only their own history; ask an admin")
        owner_uid = uid
    return [j.to_json() for j in table.finished(owner_uid=owner_uid, state=state, since=since, limit=limit)]


def _uid_of(owner: str) -> int:
    import pwd

    if owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise JobError(400, f"--owner {owner}: no such user on this box") from None


def show(caller, table: JobTable, home, key: str) -> dict:
    """One job, or an array (its members) by its base key, with `code`: what `wait` exits with
    (None while any runs)."""
    refresh(table, home)
    jobs = _targets(caller, table, key)
    codes = [policy.wait_code(j.state, j.class_, j.exit_code) for j in jobs]
    rows = [j.to_json() for j in jobs]
    if any(j.state in (QUEUED, HELD) for j in jobs):  # where they stand, as `appliance jobs` says
        placed = {r["key"]: r for r in list_jobs(caller, table, home)}
        for r in rows:
            r.update({k: placed.get(r["key"], {}).get(k) for k in ("position", "why")})
    out = {"key": key, "jobs": rows,
           "code": policy.array_code(codes) if len(jobs) > 1 or jobs[0].key != key else codes[0]}
    return out


# ---------------------------------------------------------------------------- actions

def cancel(caller, table: JobTable, home, keys: Sequence[str], ledger=None) -> list[dict]:
    """A queued or held job ends `cancelled` now and never starts; a running one is marked, and
    its runner stops it (SIGTERM, then SIGKILL after the grace) and records it `cancelled`.
    `ledger(key)`: records the cancel where other boxes see it (the exactly-once ledger), so
    whichever box claims the request from a shared queue settles it unrun."""
    refresh(table, home)
    out = []
    for key in keys:
        for job in _targets(caller, table, key):
            was = table.cancel(job.key, reason=f"cancelled by {caller.name}")
            if was is None:
                out.append({"key": job.key, "state": job.state, "done": False,
                            "message": f"{job.key} already {job.state}"})
                continue
            if ledger is not None and was != RUNNING:  # a running job's runner records how it ended
                ledger(job.key)
            out.append({"key": job.key, "state": CANCELLED if was != RUNNING else RUNNING, "done": True,
                        "message": f"{job.key} cancelled" if was != RUNNING
                        else f"{job.key} cancelling (its workload gets SIGTERM, then SIGKILL)"})
    return out


def hold(caller, table: JobTable, home, keys: Sequence[str]) -> list[dict]:
    refresh(table, home)
    out = []
    for key in keys:
        for job in _targets(caller, table, key):
            ok = table.hold(job.key)
            out.append({"key": job.key, "done": ok, "message": f"{job.key} held" if ok else
                        f"{job.key} is {job.state}: only a queued job can be held"})
    return out


def release(caller, table: JobTable, home, keys: Sequence[str]) -> list[dict]:
    refresh(table, home)
    out = []
    for key in keys:
        for job in _targets(caller, table, key):
            ok = table.release(job.key)
            out.append({"key": job.key, "done": ok, "message": f"{job.key} released" if ok else
                        f"{job.key} is {job.state}: only a held job can be released"})
    return out


def requeue_key(key: str, attempt: int) -> str:
    base = key.rsplit(".r", 1)[0] if ".r" in key and key.rsplit(".r", 1)[1].isdigit() else key
    return f"{base}.r{attempt}"


def rekeyed(body: bytes, key: str, new_key: str) -> bytes:
    """The request `body` under `new_key`: its key and its outputs' places (experiments/KEY/...)."""
    data = json.loads(body)
    data["experiment"]["key"] = new_key
    for art in (data["experiment"].get("artifacts") or {}).values():
        if isinstance(art, dict) and art.get("mutable") and isinstance(art.get("key"), str):
            art["key"] = art["key"].replace(f"experiments/{key}/", f"experiments/{new_key}/", 1)
            if isinstance(art.get("qualified"), str):
                art["qualified"] = art["qualified"].replace(f"/experiments/{key}/", f"/experiments/{new_key}/", 1)
        if isinstance(art, dict) and isinstance(art.get("local"), str):
            art["local"] = art["local"].replace(f"/experiments/{key}/", f"/experiments/{new_key}/")
    data["experiment"]["time_added"] = time.time()
    return json.dumps(data).encode()


def queued(table: JobTable, body: bytes, *, owner_uid: int, queue: str, enqueue,
           requeued_from: Optional[str] = None) -> str:
    """Queue `body` on the local `queue` for `owner_uid` (the caller the kernel named): its row
    first, then the message (`enqueue(queue, body) -> message id`), so the queue file's owner
    (root, when the API writes it) never stands for the job's. Returns the key. What the API's
    submit uses; an OSError of the queue leaves the row failed and is raised."""
    row = job_from_request(body, owner_uid=owner_uid, queue=queue, source="local")
    if row is None:
        raise JobError(400, "the request has no usable experiment key")
    row.requeued_from = requeued_from
    if not table.add(row, body):
        raise JobError(409, f"experiment key {row.key} is already a job on this appliance; use a new key")
    try:
        table.set_message_id(row.key, enqueue(queue, body))
    except OSError as e:
        table.ended(row.key, "failed", cls="infrastructure", reason=f"could not queue it: {e}")
        raise
    return row.key


def requeue(caller, table: JobTable, home, key: str, enqueue) -> dict:
    """Run a finished job again as a new attempt: the same request (same workspace, script,
    arguments) under a new key KEY.rN, its row pointing back at KEY (`requeued_from`).
    `enqueue(queue, body) -> message id` puts the body on the job's local queue."""
    job = _own(caller, table, key)
    if job.state not in FINISHED:
        raise JobError(409, f"{key} is {job.state}: requeue runs a finished job again "
                            f"(appliance cancel {key} first)")
    stored = table.request_body(key)
    if stored is None or job.source != "local":
        raise JobError(409, f"{key}: its request is not kept on this box (it came from a shared queue, "
                            f"or finished over {KEEP_REQUESTS_S / 86400:.0f} days ago): submit it again")
    queue, body = stored
    attempt = 2
    while table.get(requeue_key(key, attempt)) is not None:
        attempt += 1
    new_key = requeue_key(key, attempt)
    new_body = rekeyed(body, key, new_key)
    try:
        queued(table, new_body, owner_uid=job.owner_uid, queue=queue, enqueue=enqueue, requeued_from=key)
    except OSError as e:
        raise JobError(503, f"requeue {key}: could not write to the queue {queue}: {e}") from None
    return {"key": new_key, "requeued_from": key, "queue": queue}


def wait_codes(caller, table: JobTable, home, keys: Sequence[str]) -> dict:
    """For each key (a job, or an array's base key): `wait`'s code, None while it runs."""
    return {key: show(caller, table, home, key)["code"] for key in keys}
