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


@route("GET", "/v1/status", who="member")
def status(req: Request) -> StatusResponse:
    from appliance.status import gather

    return StatusResponse(facts=gather(req.home))
