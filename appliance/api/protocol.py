"""The appliance's API: the paths, and the request and response types that client and server share.

HTTP/1.1 + JSON on the Unix socket HOME/run/api.sock. Every path starts with `/v1`; a change
that breaks a client gets a new prefix. A body is one JSON object; an error is
`{"error": "one line"}` with a 4xx (the caller's fault) or 5xx (the appliance's) status.

Each type is a dataclass with `to_json()` and a strict `from_json()`: an unknown key, a missing
one or a value of the wrong type is a ProtocolError (the server answers 400 with its line).
Who the caller is never travels in a body: the server learns it from the kernel (SO_PEERCRED).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from appliance.api import API_VERSION, PREFIX, SOCKET_NAME  # noqa: F401 - where importers find them
MAX_BODY = 1024 * 1024  # a request body larger than this is refused (413)


class ProtocolError(ValueError):
    """A body that is not the type it should be; the message is one line naming the field."""


_SIMPLE = {str: "text", int: "a whole number", float: "a number", bool: "true or false",
           list: "a list", dict: "an object"}


def _check(name: str, hint, value):
    """`value` if it fits the annotation `hint` (str, int, float, bool, list, dict, X | None,
    list[X], dict[str, X]), else ProtocolError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and origin is getattr(types, "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(name, inner[0], value)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ProtocolError(f"'{name}' must be a list, not {type(value).__name__}")
        return [_check(f"{name}[{i}]", args[0], v) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"'{name}' must be an object, not {type(value).__name__}")
        return {k: _check(f"{name}.{k}", args[1], v) for k, v in value.items()} if args else value
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ProtocolError(f"'{name}' must be {_SIMPLE[hint]}, not true/false")
    if hint in _SIMPLE and not isinstance(value, hint):
        raise ProtocolError(f"'{name}' must be {_SIMPLE[hint]}, not {type(value).__name__}")
    return value


class Message:
    """Base of every body type: JSON in and out, checked field by field."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data):
        if not isinstance(data, dict):
            raise ProtocolError(f"the body must be a JSON object ({cls.__name__}), not {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ProtocolError(f"unknown field '{unknown[0]}' in {cls.__name__}; "
                                f"known: {', '.join(sorted(known)) or 'none'}")
        values = {}
        for name, f in known.items():
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ProtocolError(f"missing field '{name}' in {cls.__name__}")
                continue
            values[name] = _check(name, hints[name], data[name])
        return cls(**values)


# --- who is calling ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Caller(Message):
    """The peer of a connection, as the kernel says (GET /v1/whoami)."""
    uid: int
    gid: int
    pid: int
    name: str
    groups: list[int] = field(default_factory=list)
    admin: bool = False
    member: bool = False  # may use the appliance under the current queues.submit mode


@dataclass(frozen=True)
class ErrorResponse(Message):
    error: str


# --- status ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StatusResponse(Message):
    """GET /v1/status: the facts `appliance status --json` prints (appliance/status.py)."""
    facts: dict


@dataclass(frozen=True)
class VersionResponse(Message):
    """GET /v1/version: answered to anyone who can reach the socket."""
    api: str
    appliance: str


# --- members' store -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StoreAccess(Message):
    """GET /v1/me/store: the caller's own store identity (made on first use), for them alone."""
    endpoint: str
    region: str
    bucket: str
    access_key: str
    secret_key: str
    private: bool  # false on a store without identities of ours: the shared bucket and client key


@dataclass(frozen=True)
class UserAddRequest(Message):
    """POST /v1/users (admin): give the local account `name` its store identity now."""
    name: str


@dataclass(frozen=True)
class UserInfo(Message):
    name: str
    uid: int
    bucket: str


# --- submitting ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubmitRequest(Message):
    """POST /v1/submit: a StudioML request (the JSON a queue message holds) for a local queue.

    Its workspace is already in the caller's bucket; every bucket and key it names must be the
    caller's own (StoreAccess), or it is refused before anything runs. Its owner is the caller."""
    queue: str
    request: dict


@dataclass(frozen=True)
class SubmitResponse(Message):
    key: str
    queue: str
    message_id: str
    owner: str
    owner_uid: int
