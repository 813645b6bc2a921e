"""GET /v1/logs/{key}[?follow=1]: a job's output, live from its slot, for its owner or an admin.

While the job runs, its output is read from the slot's disk as it grows. Following a job that
still waits in a local queue, the answer (header `X-Appliance-Job-State: queued`) stays open
until it starts, then streams. The output of a job that is not running is in the store, in its
owner's bucket: the client reads it there with its owner's own key (appliance/actions/logs.py).
A job that neither runs nor waits here, or that is someone else's, is 404 (the same line:
whether another member's key exists is not the caller's to know).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from appliance.api import access
from appliance.api.routes import ApiError, Request, Stream, route

POLL_S = 0.5
CHUNK = 64 * 1024


def _running(home, key: str) -> dict | None:
    from appliance.runner.status import running_slot

    return running_slot(home, key)


def _mine(req: Request, owner_uid) -> bool:
    return access.may_act_on(req.caller.uid, req.caller.admin, owner_uid)


def queued(home, key: str, uid: int, admin: bool) -> bool:
    """Whether `key` waits (or is being claimed) in a local queue, sent by `uid` (anyone's for an
    admin). Reads messages as data only; the job table will answer this without a scan."""
    from appliance.queues.local import CLAIMED, is_local_queue

    root = Path(home.queue_root)
    folders = []
    for base in (root, root / CLAIMED):
        try:
            folders += [base / q for q in os.listdir(base) if is_local_queue(q)]
        except OSError:
            continue
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith(".") or e.name == "lock.lock":
                continue
            try:
                st = e.stat(follow_symlinks=False)
                if not e.is_file(follow_symlinks=False) or not (admin or st.st_uid == uid):
                    continue
                with open(e.path, "rb") as f:
                    if json.loads(f.read(1 << 20))["experiment"]["key"] == key:
                        return True
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return False


def _tail(home, key: str, path: Path, follow: bool):
    """The file's bytes, then (following) what is added while the job runs."""
    pos = 0
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                while True:
                    data = f.read(CHUNK)
                    if not data:
                        break
                    pos += len(data)
                    yield data
        except FileNotFoundError:
            return  # the job ended and its folder is gone: the rest is in the store
        if not follow or _running(home, key) is None:
            return
        time.sleep(POLL_S)


def _wait_then_tail(req: Request, key: str):
    """Wait while the job is queued or being prepared, then stream its output until it ends."""
    while True:
        running = _running(req.home, key)
        if running is not None:
            if not _mine(req, running.get("owner_uid")):
                return
            output = running.get("output")
            if output and Path(output).exists():
                yield from _tail(req.home, key, Path(output), True)
                return
        elif not queued(req.home, key, req.caller.uid, req.caller.admin):
            return  # it ended (or was dropped) meanwhile: the rest is in the store
        time.sleep(POLL_S)


@route("GET", "/v1/logs/{key}", who="member")
def logs(req: Request) -> Stream:
    key = req.params["key"]
    follow = req.query.get("follow", "") in ("1", "true", "yes")
    running = _running(req.home, key)
    if running is not None and _mine(req, running.get("owner_uid")):
        output = running.get("output")
        if output and Path(output).exists():
            return Stream(_tail(req.home, key, Path(output), follow), headers={"X-Appliance-Job-State": "running"})
        if not follow:
            raise ApiError(409, f"job {key!r} is being prepared on {running.get('slot')}: no output yet")
        return Stream(_wait_then_tail(req, key), headers={"X-Appliance-Job-State": "preparing"})
    if running is None and follow and queued(req.home, key, req.caller.uid, req.caller.admin):
        return Stream(_wait_then_tail(req, key), headers={"X-Appliance-Job-State": "queued"})
    raise ApiError(404, f"no running job {key!r} of yours here (its stored output is in your bucket)")
