"""How a claimed message is given back or settled when its job did not simply end: put back
uncounted, released counted or quarantined after a runner error, and settled at most once."""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

from appliance.runner import classes

log = logging.getLogger("appliance.runner")


DISK_FULL_BYTES = 64 << 20


def disk_full(path: Path) -> bool:
    """Less than 64 MiB free where the job lives: writes are failing or about to."""
    try:
        return shutil.disk_usage(path).free < DISK_FULL_BYTES
    except OSError:
        return False


def put_back(src, msg) -> None:
    """Give a message back without counting a try: it was not started (not here, not now, the
    store is down, the runner drains)."""
    src.release(msg, counted=False)


def release_or_quarantine(src, msg, error: BaseException, max_attempts: int) -> None:
    """A failure of the appliance itself (or of its disk) on this message: try again elsewhere or
    later, up to runner.max_attempts; then it is dead-lettered with the error."""
    attempt = int(getattr(msg, "attempt", 1) or 1)
    what = f"{type(error).__name__}: {error}"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        what = f"the disk is full ({error})"
    try:
        if attempt >= max_attempts:
            src.dead_letter(msg, f"the runner failed on this request {attempt} times; the last: {what} "
                                 f"[class: {classes.INFRASTRUCTURE}]")
        else:
            src.release(msg)
    except Exception:
        log.exception("settling %s after a runner error", msg.message_id)


class SettleOnce:
    """The message of one job, settled at most once."""

    def __init__(self, src, msg):
        self.src, self.msg, self.done = src, msg, False

    def __call__(self, how: str, *args) -> None:
        if self.done:
            return
        self.done = True
        try:
            getattr(self.src, how)(self.msg, *args)
        except Exception as e:  # e.g. the broker restarted: the result record settles it later
            log.warning("%s of %s failed: %s", how, self.msg.message_id, e)


def settle_broken(src, msg, what: str) -> str:
    """The runner failed on this message before it became a job: dead-letter it with what."""
    try:
        src.dead_letter(msg, f"the runner cannot handle this request ({what}) [class: {classes.INFRASTRUCTURE}]")
    except Exception:
        log.exception("dead-lettering %s", msg.message_id)
    return "settled"
