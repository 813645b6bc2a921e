"""The API's route table: each area registers its handlers here from its own module.

    from appliance.api.routes import Request, route

    @route("GET", "/v1/jobs/{key}", who="member")
    def show_job(req: Request) -> JobResponse: ...

A module named `appliance/api/*_routes.py` is imported by the server at start (`load_routes`),
so an area adds its routes without editing the server or this table.

`who` says who may call: "anyone" (whoever reaches the socket), "member" (whom the queue mode
lets use the appliance: see access.py), "submit" (whom it lets submit) or "admin". A handler
sees the caller in `req.caller` (from the kernel, never from the body) and returns a
protocol Message, a plain dict, a `Stream`, or raises ApiError(status, "one line").
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from appliance.api.protocol import Caller

WHO = ("anyone", "member", "submit", "admin")


class ApiError(Exception):
    """An answer other than success: an HTTP status and one line that names the thing and the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    caller: Caller
    method: str
    path: str
    params: dict[str, str]  # from the path's {names}
    query: dict[str, str]   # the last value of each ?name=value
    body: dict | None       # the JSON object sent, or None
    home: object            # appliance.paths.Home
    config: object          # appliance.config.Config, as loaded for this request


@dataclass
class Stream:
    """A response sent as it is made (chunked): e.g. a log followed as it grows."""
    chunks: Iterable[bytes]
    content_type: str = "text/plain; charset=utf-8"
    status: int = 200
    headers: dict = field(default_factory=dict)  # e.g. {"X-Appliance-Job-State": "queued"}


@dataclass
class Route:
    method: str
    pattern: str
    handler: Callable
    who: str
    regex: re.Pattern = field(repr=False, default=None)


ROUTES: list[Route] = []
_PARAM = re.compile(r"\{([a-z_]+)\}")


def _compile(pattern: str) -> re.Pattern:
    parts, last = [], 0
    for m in _PARAM.finditer(pattern):
        parts.append(re.escape(pattern[last:m.start()]))
        parts.append(f"(?P<{m.group(1)}>[^/]+)")
        last = m.end()
    parts.append(re.escape(pattern[last:]))
    return re.compile("^" + "".join(parts) + "$")


def route(method: str, pattern: str, who: str = "member"):
    """Register the decorated function as the handler of METHOD PATTERN."""
    if who not in WHO:
        raise ValueError(f"who={who!r} is not one of {WHO}")
    if not pattern.startswith("/v"):
        raise ValueError(f"{pattern!r}: API paths start with their version, e.g. /v1/")

    def register(handler):
        for r in ROUTES:
            if r.method == method and r.pattern == pattern:
                raise ValueError(f"{method} {pattern} is registered twice ({r.handler.__module__})")
        ROUTES.append(Route(method, pattern, handler, who, _compile(pattern)))
        return handler
    return register


def match(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route for METHOD PATH and its path parameters; ApiError 404 or 405 when none."""
    allowed = []
    for r in ROUTES:
        m = r.regex.match(path)
        if m:
            if r.method == method:
                return r, m.groupdict()
            allowed.append(r.method)
    if allowed:
        raise ApiError(405, f"{method} is not allowed on {path}; use {', '.join(sorted(set(allowed)))}")
    raise ApiError(404, f"no such API path: {path} (see docs/api.md)")


def load_routes() -> list[Route]:
    """Import every appliance/api/*_routes.py module (each registers its routes); the table."""
    import appliance.api as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.endswith("_routes"):
            importlib.import_module(f"appliance.api.{info.name}")
    return ROUTES
