"""POST /v1/submit: a member's StudioML request onto a local queue, owned by the caller.

The workspace is already in the member's bucket (the client sent it with the member's key). The
request is checked as a runner would read it (parse_request) and for anything not the member's
own (submit_check.py), then written to the queue as a file of the caller's uid, mode 0600: the
job's owner is that uid, which the kernel gave, never a field of the request.
"""

from __future__ import annotations

import json

from appliance.api.member_routes import store_of
from appliance.api.protocol import SubmitRequest, SubmitResponse
from appliance.api.routes import ApiError, Request, route
from appliance.api.submit_check import foreign_reference


@route("POST", "/v1/submit", who="submit")
def submit(req: Request) -> SubmitResponse:
    from appliance.queues.local import is_local_queue
    from appliance.studioml.request import BadRequest, parse_request

    body = SubmitRequest.from_json(req.body or {})
    if not is_local_queue(body.queue):
        raise ApiError(400, f"queue {body.queue!r}: only local queues (names starting with 'local') take "
                            "submissions here")
    data = json.dumps(body.request).encode()
    try:
        parsed = parse_request(data)
    except BadRequest as e:
        raise ApiError(400, f"the request cannot run: {e}") from None
    store = store_of(req, req.caller.uid, req.caller.name)
    if store.private:
        foreign = foreign_reference(body.request, parsed.artifacts, store.bucket, store.access_key, store.endpoint)
        if foreign:
            raise ApiError(403, foreign)
    msgid = record_and_enqueue(req.home, body.queue, data, req.caller.uid)
    return SubmitResponse(key=parsed.key, queue=body.queue, message_id=msgid, owner=req.caller.name,
                          owner_uid=req.caller.uid)


def record_and_enqueue(home, queue: str, data: bytes, owner_uid: int) -> str:
    """The job's row first (so `appliance wait KEY` right after `submit` finds it), then the
    message, a file of `owner_uid`; its message id."""
    from appliance.jobs.control import JobError, queued
    from appliance.jobs.table import JobTable
    from appliance.queues.local import enqueue

    ids = []
    table = JobTable.of(home)
    try:
        queued(table, data, owner_uid=owner_uid, queue=queue,
               enqueue=lambda q, b: ids.append(enqueue(home.queue_root, q, b, owner_uid=owner_uid)) or ids[-1])
    except JobError as e:
        raise ApiError(e.status, e.message) from None
    except OSError as e:
        raise ApiError(507, f"cannot write to the queue {queue}: {e.strerror or e}; ask an admin") from None
    finally:
        table.close()
    return ids[-1]
