"""The API's own routes: who am I, which version, and the appliance's status."""

from __future__ import annotations

from appliance import __version__
from appliance.api.protocol import API_VERSION, StatusResponse, VersionResponse
from appliance.api.routes import Request, route


@route("GET", "/v1/version", who="anyone")
def version(req: Request) -> VersionResponse:
    return VersionResponse(api=API_VERSION, appliance=__version__)


@route("GET", "/v1/whoami", who="anyone")
def whoami(req: Request):
    return req.caller


OTHERS_JOB = "(another member's job)"


def for_member(facts: dict, uid: int) -> dict:
    """`facts` as member `uid` may see them: their own jobs' keys, outputs and results; of the
    others' only that a slot is busy."""
    slots = []
    for s in facts.get("slots", []):
        s = dict(s)
        if s.get("experiment") and s.get("owner_uid") != uid:
            s.update(experiment=OTHERS_JOB, output=None, gpu_use=None)
        last = s.get("last_result") or {}
        if last and last.get("owner_uid") != uid:
            s["last_result"] = None
        slots.append(s)
    queues = [{**r, "cannot_run": []} for r in facts.get("queue_rows") or []]  # others' keys
    return {**facts, "slots": slots, "queue_rows": queues}


@route("GET", "/v1/status", who="member")
def status(req: Request) -> StatusResponse:
    from appliance.status import gather

    facts = gather(req.home)
    return StatusResponse(facts=facts if req.caller.admin else for_member(facts, req.caller.uid))
