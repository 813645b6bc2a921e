"""The event spool: what runners and the controller append, one JSON line per event.

Emitters (runners, the controller) append one JSON line per event to their own file,
`HOME/status/events/<writer>.jsonl` (root's alone, 0700/0600: events name experiments). That is
all they do, and nothing there can raise, block or slow a job. Delivery (the webhooks) is the
controller's, in appliance/notify.py; a runner imports this module, never that one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("appliance.notify")

MAX_TEXT = 2000
LOCK_TRIES = 50  # an emitter waits at most ~0.5 s for the spool lock (held for a truncate only)


def spool_dir(home) -> Path:
    return Path(home.status_dir) / "events"


def _ensure_spool(home) -> Path:
    d = spool_dir(home)
    if not d.is_dir():
        d.mkdir(parents=True, exist_ok=True)
    if d.stat().st_mode & 0o077:
        os.chmod(d, 0o700)
    return d


def _lock(fd: int) -> bool:
    for _ in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.01)
    return False


# ------------------------------------------------------------------ emitting


def emit(home, writer: str, event: str, text: str, **fields) -> None:
    """Append one event to `writer`'s spool file. Never raises: a notification must not cost a job."""
    try:
        record = {"event": event, "time": time.time(), "host": socket.gethostname(), "source": writer,
                  "text": text[:MAX_TEXT], **fields}
        line = (json.dumps(record, default=str) + "\n").encode()
        path = _ensure_spool(home) / f"{writer.replace('/', '_')}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            _lock(fd)  # the controller empties a file under this lock; past the wait, append anyway
            os.write(fd, line)
        finally:
            os.close(fd)
    except Exception as e:  # noqa: BLE001
        log.warning("notification %s not recorded: %s", event, e)


def _experiment_key(body: bytes) -> Optional[str]:
    try:
        key = json.loads(body)["experiment"]["key"]
        return key if isinstance(key, str) else None
    except (ValueError, KeyError, TypeError):
        return None


class _Announcing:
    """A queue source that reports its final settlements (ack, dead letter) as events."""

    def __init__(self, inner, runner):
        self._inner, self._runner = inner, runner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def ack(self, msg) -> None:
        self._inner.ack(msg)
        _settled(self._runner, msg, None)

    def dead_letter(self, msg, reason: str) -> None:
        self._inner.dead_letter(msg, reason)
        _settled(self._runner, msg, reason)


def announce_settlements(runner) -> list:
    """The runner's queue sources, wrapped so a job finished, failed or dead-lettered is an event."""
    return [_Announcing(s, runner) for s in runner.sources]


def _settled(runner, msg, reason: Optional[str]) -> None:
    try:
        key = _experiment_key(msg.body)
        status = runner.status.data
        ran = key is not None and status.get("experiment") == key  # the job had started here
        elapsed = time.time() - status["started"] if ran and status.get("started") else None
        took = f" after {_duration(elapsed)}" if elapsed is not None else ""
        fields = {"experiment": key, "slot": runner.slot, "queue": msg.queue, "queue_source": msg.source,
                  "message_id": msg.message_id, "elapsed_s": elapsed}
        if reason is None:
            emit(runner.home, runner.slot, "job_finished",
                 f"experiment {key} finished on {runner.slot}{took} (queue {msg.queue})", **fields)
        elif ran:
            emit(runner.home, runner.slot, "job_failed",
                 f"experiment {key} FAILED on {runner.slot}{took} (queue {msg.queue}): {reason}",
                 reason=reason, **fields)
        else:
            what = f"experiment {key}" if key else f"message {msg.message_id}"
            emit(runner.home, runner.slot, "job_dead_lettered",
                 f"{what} from queue {msg.queue} was dead-lettered by {runner.slot}: {reason}",
                 reason=reason, **fields)
    except Exception as e:  # noqa: BLE001
        log.warning("notification for message %s not recorded: %s", getattr(msg, "message_id", "?"), e)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
