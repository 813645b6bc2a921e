"""The credentials directory, read live: which queue sources a runner serves right now.

One entry per queue source (docs/queues.md has the formats, examples/credentials/ examples):

    credentials/<name>.toml   RabbitMQ: url = "amqp://...", optional management, queues, lease
    credentials/<name>/       SQS: an AWS `credentials` + `config` pair (StudioML Go runner's
                              layout), optional endpoint_url for a local SQS-compatible server

The local directory queue is always served. Names starting with "." and editors' leftovers
(`~`, `.swp`, `.tmp`, `.part`) are ignored, so an editor's atomic save (write a temp file, rename
it over the entry) is seen once, complete.

`SourceSet` is the one queue source a runner gets: it watches the directory with inotify (without
inotify it looks, a few stat calls, every 0.25 s), opens sources for new entries, stops claiming
from removed or changed ones at once while their claimed messages still settle on their open
connection, and closes them after. A broken entry (bad URL, wrong password, unreadable,
half-written) is logged and retried every few seconds; it never touches other entries. Sharing
policy: every slot serves every source, taking turns queue by queue (the runner's round-robin),
so no source starves.
"""

from __future__ import annotations

import json
import logging
import os
import select
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from appliance.files import write_atomic
from appliance.queues.base import Claimed
from appliance.queues.entries import (  # noqa: F401 - where importers find them
    Entry, check_entry, directory_signature, ignored, open_source, parse_rabbit, read_entries, read_entry)


log = logging.getLogger("appliance.queues.sources")

CHECK_EVERY_S = 0.25  # without inotify: how often the directory is looked at
RECHECK_S = 60.0  # with inotify: looked at all the same this often, at a wake-up that comes anyway
RETRY_BROKEN_S = 5.0
REMOTE_POLL_S = 0.5
POLICY = "every slot serves every source, taking turns queue by queue"


def _watch(root: Path):
    """An inotify watch on the credentials directory (and its parent: it may be made later),
    or None where inotify is not available."""
    from appliance.inotify import Watch

    try:
        watch = Watch()
    except OSError as e:
        log.warning("cannot watch %s (%s): looking at it every %.2fs", root, e, CHECK_EVERY_S)
        return None
    watch.tree(root)
    return watch


def credentials_dir(home, config=None) -> Path:
    configured = getattr(getattr(config, "queues", None), "credentials_dir", "") if config else ""
    return Path(configured).expanduser() if configured else Path(home.credentials_dir)


def sources_file(home) -> Path:
    """What the controller found in the credentials directory (state per entry)."""
    return Path(home.run_dir) / "sources.json"


def serving_file(home, slot: str) -> Path:
    """Which sources and queues one runner serves now."""
    return Path(home.run_dir) / "serving" / f"{slot}.json"


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
        self._watch = _watch(self.root)  # None: no inotify, look every check_every_s
        self._dirty = False  # the watch saw a change not yet read
        self._last_remote_poll = 0.0
        self._served: Optional[dict] = None
        self.refresh(force=True)

    # -- keeping up with the directory

    def refresh(self, force: bool = False) -> bool:
        """Re-read the directory if it changed; True if the set of sources changed."""
        now = time.monotonic()
        if self._watch is not None:
            self._dirty |= bool(self._watch.changed())
            due = self._dirty or now - self._checked >= RECHECK_S or any(
                b.retry_at <= now for b in self.broken.values() if not b.entry.error)
            if not force and not due:
                return False
            self._dirty = False
        elif not force and now - self._checked < self.check_every_s:
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

    def wait(self, timeout: float, wake_fd: Optional[int] = None) -> bool:
        """Until a local message may be there, the sources changed, remote queues are due for
        another poll (every 0.5 s while any remote source is served), a broken entry is due for
        another try, or `wake_fd` is readable (left for the caller to read)."""
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
            step = left
            if self.live:
                step = min(step, self._last_remote_poll + REMOTE_POLL_S - now)
            retries = [b.retry_at for b in self.broken.values() if not b.entry.error]
            if retries:
                step = min(step, max(0.0, min(retries) - now))
            if self._watch is None:
                step = min(step, self.check_every_s)
            local = self.local.fileno()
            watch = self._watch.fd if self._watch is not None else None
            fds = [fd for fd in (local, watch, wake_fd) if fd is not None]
            ready: list = []
            if not fds:
                time.sleep(step)
            else:
                try:
                    ready = select.select(fds, [], [], step)[0]
                except InterruptedError:
                    pass
            if local is not None and local in ready and self.local.woken():
                return True
            if wake_fd is not None and wake_fd in ready:
                return True
            # the watch's events are read by refresh(), at the top of the loop

    def close(self) -> None:
        for src in self._sources()[1:] + self.retiring:
            self._close(src)
        self.live.clear()
        self.retiring.clear()
        self._close(self.local)
        if self._watch is not None:
            self._watch.close()
            self._watch = None

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
           "serving_file", "directory_signature", "parse_rabbit", "POLICY"]
