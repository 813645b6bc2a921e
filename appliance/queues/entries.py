"""The credentials directory's entries, one per queue source (docs/queues.md has the formats):
`credentials/<name>.toml` (RabbitMQ) or `credentials/<name>/` (SQS). Reading and checking an
entry, its signature (so a change is seen once, complete: editors' leftovers are ignored), and
opening its source. `sources.py` keeps the live set a runner serves.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from appliance.units import parse_duration

if TYPE_CHECKING:
    from appliance.queues.rabbitmq import RabbitSpec

IGNORED_SUFFIXES = ("~", ".swp", ".swx", ".tmp", ".part", ".bak", ".md", ".txt")
RABBIT_SUFFIXES = (".toml", ".rmq")

log = logging.getLogger("appliance.queues.sources")


@dataclass(frozen=True)
class Entry:
    name: str  # the file or folder name
    kind: str  # "rabbitmq", "sqs" or "unknown"
    path: Path
    signature: tuple
    spec: Any = None  # RabbitSpec / SqsSpec when the entry parsed
    error: str = ""  # why it cannot be used

    @property
    def source_name(self) -> str:
        return f"{self.kind}:{_stem(self.name)}"


def _stem(name: str) -> str:
    for suffix in RABBIT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES) or name == "4913" or \
        name.lower().startswith("readme")


def _stat_sig(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None)
    return (path.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


def directory_signature(root: Path) -> tuple:
    """Changes whenever an entry is added, removed, replaced or edited. Cheap: a few stats."""
    try:
        names = sorted(os.listdir(root))
    except OSError as e:
        return ("missing", e.errno)
    sig = []
    for name in names:
        if ignored(name):
            continue
        path = root / name
        sig.append(_entry_signature(path))
    return tuple(sig)


def _entry_signature(path: Path) -> tuple:
    if path.is_dir():
        try:
            inner = sorted(n for n in os.listdir(path) if not ignored(n))
        except OSError:
            inner = []
        return (_stat_sig(path),) + tuple(_stat_sig(path / n) for n in inner)
    return (_stat_sig(path),)


def _as_list(value, key: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{key}' must be a list of queue names")
    return tuple(value)


def parse_rabbit(text: str) -> RabbitSpec:
    """A RabbitMQ entry: TOML (url, management, queues, lease_after, lease), or bare URL lines."""
    from appliance.queues.rabbitmq import RabbitSpec  # pika loads only where RabbitMQ is used
    stripped = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not stripped:
        raise ValueError("the file is empty (still being written?)")
    if stripped[0].startswith(("amqp://", "amqps://")):
        data = {"url": stripped[0]}
        if len(stripped) > 1 and stripped[1].startswith(("http://", "https://")):
            data["management"] = stripped[1]
    else:
        try:
            data = tomllib.loads(text)
        except Exception as e:  # noqa: BLE001 - whatever the parser says, the entry is not TOML
            raise ValueError(f"not valid TOML ({e}); is it still being written?") from None
    known = {"url", "management", "queues", "lease_after", "lease", "heartbeat"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    url = data.get("url")
    if not isinstance(url, str) or not url.startswith(("amqp://", "amqps://")):
        raise ValueError(f"'url' must be an AMQP URL like amqp://user:password@host:5672/%2f, not {url!r}")
    management = data.get("management", "")
    if management and (not isinstance(management, str) or not management.startswith(("http://", "https://"))):
        raise ValueError(f"'management' must be an http(s) URL like http://host:15672, not {management!r}")
    spec = RabbitSpec(url=url, management=management or "", queues=_as_list(data.get("queues"), "queues"))
    try:
        if "lease_after" in data:
            spec = RabbitSpec(**{**spec.__dict__, "lease_after_s": parse_duration(data["lease_after"])})
        if "lease" in data:
            spec = RabbitSpec(**{**spec.__dict__, "lease_s": parse_duration(data["lease"])})
        if "heartbeat" in data:
            spec = RabbitSpec(**{**spec.__dict__, "heartbeat_s": int(parse_duration(data["heartbeat"]))})
    except ValueError as e:
        raise ValueError(f"lease_after / lease / heartbeat: {e}") from None
    if spec.lease_s <= spec.lease_after_s:
        raise ValueError(f"lease ({spec.lease_s:g}s) must be longer than lease_after ({spec.lease_after_s:g}s)")
    return spec


def read_entry(path: Path) -> Entry:
    name = path.name
    sig = _entry_signature(path)
    if path.is_dir():
        import configparser  # an SQS entry's AWS files (sqs.py reads them): not in every runner

        try:
            from appliance.queues.sqs import parse_sqs_dir

            return Entry(name, "sqs", path, sig, spec=parse_sqs_dir(path))
        except (ValueError, OSError, configparser.Error) as e:
            return Entry(name, "sqs", path, sig, error=_reason(e))
    if name.endswith(RABBIT_SUFFIXES):
        try:
            return Entry(name, "rabbitmq", path, sig, spec=parse_rabbit(path.read_text()))
        except (ValueError, OSError, UnicodeDecodeError) as e:
            return Entry(name, "rabbitmq", path, sig, error=_reason(e))
    return Entry(name, "unknown", path, sig,
                 error="not a queue entry: expected NAME.toml (RabbitMQ) or a folder holding an AWS "
                       "credentials + config pair (SQS)")


def _reason(e: Exception) -> str:
    if isinstance(e, OSError):
        return f"cannot read: {e.strerror or e}"
    return str(e)


def read_entries(root: Path) -> list[Entry]:
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    except OSError as e:
        log.warning("credentials directory %s: %s", root, e.strerror)
        return []
    return [read_entry(root / n) for n in names if not ignored(n)]


def open_source(entry: Entry):
    """A live QueueSource for a parsed entry; raises RabbitError / SqsError with the reason."""
    if entry.kind == "rabbitmq":
        from appliance.queues.rabbitmq import RabbitSource

        return RabbitSource(entry.source_name, entry.spec)
    if entry.kind == "sqs":
        from appliance.queues.sqs import SqsSource

        return SqsSource(entry.source_name, entry.spec)
    raise ValueError(entry.error)


def check_entry(entry: Entry) -> tuple[str, str, list]:
    """("ok", "", queues) or ("broken", reason, []): what the controller shows."""
    if entry.error:
        return "broken", entry.error, []
    try:
        if entry.kind == "rabbitmq":
            from appliance.queues.rabbitmq import check

            return "ok", "", check(entry.spec)
        if entry.kind == "sqs":
            from appliance.queues.sqs import check

            return "ok", "", check(entry.spec)
    except Exception as e:  # noqa: BLE001 - whatever a broker says, it is this entry's problem
        return "broken", str(e) or type(e).__name__, []
    return "broken", "unknown entry type", []
