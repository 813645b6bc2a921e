"""GET /v1/logs/{key}[?follow=1]: a running job's output, live from its slot, for its owner or an admin.

The output of a job that is not running is in the store, in its owner's bucket: the client
reads it there with its owner's own key (appliance/actions/logs.py). This route answers 404
for a job that does not run here, or that is someone else's (the same line: whether another
member's key exists is not the caller's to know).
"""

from __future__ import annotations

import time
from pathlib import Path

from appliance.api import access
from appliance.api.routes import ApiError, Request, Stream, route

POLL_S = 0.5
CHUNK = 64 * 1024


def _running(home, key: str) -> dict | None:
    from appliance.runner.status import running_slot

    return running_slot(home, key)


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


@route("GET", "/v1/logs/{key}", who="member")
def logs(req: Request) -> Stream:
    key = req.params["key"]
    running = _running(req.home, key)
    if running is None or not access.may_act_on(req.caller.uid, req.caller.admin, running.get("owner_uid")):
        raise ApiError(404, f"no running job {key!r} of yours here (its stored output is in your bucket)")
    output = running.get("output")
    if not output or not Path(output).exists():
        raise ApiError(409, f"job {key!r} is being prepared on {running.get('slot')}: no output yet")
    follow = req.query.get("follow", "") in ("1", "true", "yes")
    return Stream(_tail(req.home, key, Path(output), follow))
