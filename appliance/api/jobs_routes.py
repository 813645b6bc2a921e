"""The API's job-control routes, over the job table (appliance/jobs/): list, history, one job,
cancel, hold, release, requeue. Who may see or act on which job is decided in
appliance/jobs/control.py (a member: their own; an admin: all).

    GET  /v1/jobs                       queued, held and running jobs (each waiting one with `why`)
    GET  /v1/history?owner=&state=&since=&limit=
    GET  /v1/jobs/{key}?wait=S          a job, or an array by its base key, with `code` (what
                                        `wait` exits with; null while it runs); wait=S answers
                                        when it ends or after S seconds (at most 60)
    POST /v1/jobs/cancel   {"keys": [...]}
    POST /v1/jobs/hold     {"keys": [...]}
    POST /v1/jobs/release  {"keys": [...]}
    POST /v1/jobs/requeue  {"key": "..."}
"""

from __future__ import annotations

import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass

from appliance.api.protocol import Message
from appliance.api.routes import ApiError, Request, route
from appliance.jobs import control
from appliance.jobs.table import JobTable

MAX_WAIT_S = 60.0


@dataclass(frozen=True)
class KeysRequest(Message):
    keys: list[str]


@dataclass(frozen=True)
class RequeueRequest(Message):
    key: str


@contextmanager
def _table(req: Request):
    """The table, opened for this request (one connection per thread; opening costs ~0.2 ms)."""
    table = JobTable.of(req.home)
    try:
        yield table
    except control.JobError as e:
        raise ApiError(e.status, e.message) from None
    finally:
        table.close()


def _ledger(req: Request, table: JobTable):
    """Records the cancel of a waiting job from a shared queue (RabbitMQ, SQS) in the
    exactly-once ledger, so whichever box claims that request settles it unrun. A local queue's
    job needs no more than the table: only this box's runners claim it."""
    def record(key: str) -> None:
        job, stored = table.get(key), table.request_body(key)
        if job is None or job.source == "local" or stored is None:
            return
        from appliance.runner.ledger import record_cancel

        record_cancel(stored[1], req.caller.name, home=req.home)
    return record


@route("GET", "/v1/jobs", who="member")
def list_jobs(req: Request):
    with _table(req) as table:
        return {"jobs": control.list_jobs(req.caller, table, req.home)}


@route("GET", "/v1/history", who="member")
def history(req: Request):
    q = req.query
    try:
        since = float(q["since"]) if q.get("since") else None
        limit = int(q.get("limit") or 100)
    except ValueError:
        raise ApiError(400, "since is epoch seconds and limit a whole number") from None
    with _table(req) as table:
        return {"jobs": control.history(req.caller, table, owner=q.get("owner") or None,
                                        state=q.get("state") or None, since=since, limit=limit)}


@route("GET", "/v1/jobs/{key}", who="member")
def show(req: Request):
    key = urllib.parse.unquote(req.params["key"])
    try:
        wait = min(MAX_WAIT_S, max(0.0, float(req.query.get("wait") or 0)))
    except ValueError:
        raise ApiError(400, "wait is a number of seconds") from None
    end = time.monotonic() + wait
    with _table(req) as table:
        while True:
            out = control.show(req.caller, table, req.home, key)
            if out["code"] is not None or time.monotonic() >= end:
                return out
            time.sleep(0.5)


def _keys(req: Request) -> list[str]:
    keys = KeysRequest.from_json(req.body or {}).keys
    if not keys:
        raise ApiError(400, "name at least one job key")
    return keys


@route("POST", "/v1/jobs/cancel", who="member")
def cancel(req: Request):
    keys = _keys(req)
    with _table(req) as table:
        return {"results": control.cancel(req.caller, table, req.home, keys, ledger=_ledger(req, table))}


@route("POST", "/v1/jobs/hold", who="member")
def hold(req: Request):
    keys = _keys(req)
    with _table(req) as table:
        return {"results": control.hold(req.caller, table, req.home, keys)}


@route("POST", "/v1/jobs/release", who="member")
def release(req: Request):
    keys = _keys(req)
    with _table(req) as table:
        return {"results": control.release(req.caller, table, req.home, keys)}


@route("POST", "/v1/jobs/requeue", who="submit")
def requeue(req: Request):
    key = RequeueRequest.from_json(req.body or {}).key
    from appliance.queues.local import enqueue

    with _table(req) as table:
        return control.requeue(req.caller, table, req.home, key,
                               lambda queue, body: enqueue(req.home.queue_root, queue, body))
