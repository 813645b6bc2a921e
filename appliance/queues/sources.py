"""The credentials directory, read live: which queue sources a runner serves right now.

One entry per queue source (docs/queues.md has the formats, examples/credentials/ examples):

    credentials/<name>.toml   RabbitMQ: url = "amqp://...", optional management, queues, lease
    credentials/<name>/       SQS: an AWS `credentials` + `config` pair (StudioML Go runner's
                              layout), optional endpoint_url for a local SQS-compatible server

The local directory queue is always served. Names starting with "." and editors' leftovers
(`~`, `.swp`, `.tmp`, `.part`) are ignored, so an editor's atomic save (write a temp file, rename
it over the entry) is seen once, complete.

`SourceSet` is the one queue source a runner gets: it looks at the directory (a few stat calls)
at most every 0.25 s, opens sources for new entries, stops claiming from removed or changed
ones at once while their claimed messages still settle on their open connection, and closes
them after. A broken entry (bad URL, wrong password, unreadable, half-written) is logged and
retried every few seconds; it never touches other entries. Sharing policy: every slot serves
every source, taking turns queue by queue (the runner's round-robin), so no source starves.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import tomlkit

from appliance.files import write_atomic
from appliance.queues.base import Claimed
from appliance.queues.rabbitmq import RabbitError, RabbitSpec
from appliance.units import parse_duration

log = logging.getLogger("appliance.queues.sources")

IGNORED_SUFFIXES = ("~", ".swp", ".swx", ".tmp", ".part", ".bak", ".md", ".txt")
RABBIT_SUFFIXES = (".toml", ".rmq")
CHECK_EVERY_S = 0.25
RETRY_BROKEN_S = 5.0
REMOTE_POLL_S = 0.5
POLICY = "every slot serves every source, taking turns queue by queue"


def credentials_dir(home, config=None) -> Path:
    configured = getattr(getattr(config, "queues", None), "credentials_dir", "") if config else ""
    return Path(configured).expanduser() if configured else Path(home.credentials_dir)


def sources_file(home) -> Path:
    """What the controller found in the credentials directory (state per entry)."""
    return Path(home.run_dir) / "sources.json"


def serving_file(home, slot: str) -> Path:
    """Which sources and queues one runner serves now."""
    return Path(home.run_dir) / "serving" / f"{slot}.json"


# ---------------------------------------------------------------- entries

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
    stripped = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not stripped:
        raise ValueError("the file is empty (still being written?)")
    if stripped[0].startswith(("amqp://", "amqps://")):
        data = {"url": stripped[0]}
        if len(stripped) > 1 and stripped[1].startswith(("http://", "https://")):
            data["management"] = stripped[1]
    else:
        try:
            data = tomlkit.parse(text).unwrap()
        except Exception as e:  # noqa: BLE001 - tomlkit's parse errors have several types
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


# ---------------------------------------------------------------- the live set

@dataclass
class _Live:
    entry: Entry
    source: Any


@dataclass
class _Broken:
    entry: Entry
    reason: str
    retry_at: float = field(default=0.0)


class SourceSet:
    """One QueueSource over the local queue and every entry of the credentials directory."""

    name = "sources"

    def __init__(self, home, config=None, slot: str = "runner", local=None,
                 check_every_s: float = CHECK_EVERY_S, write_serving: bool = True):
        from appliance.queues.local import LocalQueueSource

        self.home = home
        self.slot = slot
        self.root = credentials_dir(home, config)
        self.local = local if local is not None else LocalQueueSource(home.queue_root, runner_id=slot)
        self.check_every_s = check_every_s
        self.write_serving = write_serving
        self.live: dict[str, _Live] = {}  # entry name -> open source
        self.broken: dict[str, _Broken] = {}
        self.retiring: list = []  # sources no longer served, still holding claimed messages
        self._sig: Optional[tuple] = None
        self._checked = 0.0
        self._last_remote_poll = 0.0
        self._served: Optional[dict] = None
        self.refresh(force=True)

    # -- keeping up with the directory

    def refresh(self, force: bool = False) -> bool:
        """Re-read the directory if it changed; True if the set of sources changed."""
        now = time.monotonic()
        if not force and now - self._checked < self.check_every_s:
            return False
        self._checked = now
        sig = directory_signature(self.root)
        retry = any(b.retry_at <= now for b in self.broken.values() if not b.entry.error)
        if sig == self._sig and not retry:
            return False
        self._sig = sig
        changed = False
        entries = {e.name: e for e in read_entries(self.root)}
        for name in list(self.live):
            e = entries.get(name)
            if e is None or e.signature != self.live[name].entry.signature:
                self._retire(name, "removed" if e is None else "changed")
                changed = True
        for name in list(self.broken):
            e = entries.get(name)
            if e is None or e.signature != self.broken[name].entry.signature:
                del self.broken[name]
        for name, e in entries.items():
            if name in self.live:
                continue
            b = self.broken.get(name)
            if b is not None and (b.entry.error or b.retry_at > now):
                continue
            if e.error:
                log.warning("credentials entry %s: %s", name, e.error)
                self.broken[name] = _Broken(e, e.error)
                continue
            try:
                source = open_source(e)
            except Exception as exc:  # noqa: BLE001 - one broken entry must not stop the others
                reason = str(exc) or type(exc).__name__
                if b is None or b.reason != reason:
                    log.warning("credentials entry %s: %s (retrying every %.0fs)", name, reason, RETRY_BROKEN_S)
                self.broken[name] = _Broken(e, reason, now + RETRY_BROKEN_S)
                continue
            self.broken.pop(name, None)
            self.live[name] = _Live(e, source)
            log.info("serving %s (credentials entry %s)", source.name, name)
            changed = True
        return changed

    def _retire(self, name: str, why: str) -> None:
        live = self.live.pop(name)
        log.info("no longer claiming from %s: credentials entry %s %s", live.source.name, name, why)
        if getattr(live.source, "holding", 0):
            self.retiring.append(live.source)
        else:
            self._close(live.source)

    @staticmethod
    def _close(source) -> None:
        try:
            source.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            log.exception("closing %s", getattr(source, "name", source))

    def _sources(self) -> list:
        return [self.local] + [self.live[n].source for n in sorted(self.live)]

    def _owner(self, msg: Claimed):
        for src in self._sources() + self.retiring:
            if src.name == msg.source:
                return src
        raise KeyError(f"no queue source {msg.source!r} (message {msg.message_id})")

    def _settled(self, src) -> None:
        if src in self.retiring and not getattr(src, "holding", 0):
            self.retiring.remove(src)
            self._close(src)
            log.info("closed %s: its last claimed message is settled", src.name)

    # -- QueueSource

    def queues(self) -> list[str]:
        self.refresh()
        keys, served = [], {}
        for src in self._sources():
            try:
                names = src.queues()
            except Exception as e:  # noqa: BLE001 - a source that fails now is skipped this turn
                log.warning("listing queues of %s: %s", src.name, e)
                names = []
            served[src.name] = names
            keys += [f"{src.name}/{q}" for q in names]
        self._note_serving(served)
        return keys

    def claim(self, key: str, prefer: tuple = ()) -> Optional[Claimed]:
        source_name, queue = key.split("/", 1)
        for src in self._sources():
            if src.name == source_name:
                return src.claim(queue, prefer=prefer) if prefer else src.claim(queue)
        return None  # its entry went away since queues() listed it

    def keepalive(self, msg: Claimed) -> None:
        self._owner(msg).keepalive(msg)
        self.refresh()  # a removed entry stops being claimed from even while this job runs

    def ack(self, msg: Claimed) -> None:
        src = self._owner(msg)
        src.ack(msg)
        self._settled(src)

    def release(self, msg: Claimed, counted: bool = True) -> None:
        src = self._owner(msg)
        src.release(msg, counted=counted)
        self._settled(src)

    def dead_letter(self, msg: Claimed, reason: str) -> None:
        src = self._owner(msg)
        src.dead_letter(msg, reason)
        self._settled(src)

    def refuse(self, msg: Claimed, record: dict) -> None:
        src = self._owner(msg)
        src.refuse(msg, record)
        self._settled(src)

    def depth(self, key: str) -> Optional[int]:
        source_name, queue = key.split("/", 1)
        for src in self._sources():
            if src.name == source_name:
                depth = getattr(src, "depth", None)
                return depth(queue) if depth else None
        return None

    def recover_orphans(self) -> int:
        return self.local.recover_orphans()

    def wait(self, timeout: float) -> bool:
        """Until a local message may be there, the sources changed, or remote queues are due
        for another poll (every 0.5 s while any remote source is served)."""
        end = time.monotonic() + max(0.0, timeout)
        while True:
            if self.refresh():
                return True
            now = time.monotonic()
            if self.live and now - self._last_remote_poll >= REMOTE_POLL_S:
                self._last_remote_poll = now
                return True
            left = end - now
            if left <= 0:
                return False
            step = min(left, self.check_every_s)
            if hasattr(self.local, "wait"):
                if self.local.wait(step):
                    return True
            else:
                time.sleep(step)

    def close(self) -> None:
        for src in self._sources()[1:] + self.retiring:
            self._close(src)
        self.live.clear()
        self.retiring.clear()
        self._close(self.local)

    # -- what `appliance status` shows

    def _note_serving(self, served: dict) -> None:
        broken = {b.entry.source_name: b.reason for b in self.broken.values()}
        state = {"sources": served, "broken": broken}
        if not self.write_serving or state == self._served:
            return
        self._served = state
        try:
            write_atomic(serving_file(self.home, self.slot),
                         json.dumps({"slot": self.slot, "pid": os.getpid(), "time": time.time(),
                                     "policy": POLICY, **state}, indent=1) + "\n")
        except OSError as e:
            log.warning("writing %s: %s", serving_file(self.home, self.slot), e)


__all__ = ["SourceSet", "Entry", "read_entries", "check_entry", "credentials_dir", "sources_file",
           "serving_file", "directory_signature", "parse_rabbit", "RabbitError", "POLICY"]
