"""A one-line progress meter on stderr for a step that takes over a second: bytes done of
the total, rate, time left. Silent when stderr is not a terminal (a pipe, a log, CI)."""

from __future__ import annotations

import _thread
import sys
import time
from typing import Optional

from appliance.units import format_size

SHOW_AFTER_S = 1.0
REDRAW_EVERY_S = 0.2


def line(label: str, done: int, total: int, elapsed: float) -> str:
    """`packing  512.0MiB/2.0GiB  25%  180.0MiB/s  8s left`."""
    rate = done / elapsed if elapsed > 0 else 0.0
    pct = f"{100 * done // total}%" if total else ""
    left = f"{int((total - done) / rate)}s left" if rate > 0 and total >= done else ""
    return "  ".join(x for x in (label, f"{format_size(done)}/{format_size(total)}", pct,
                                 f"{format_size(int(rate))}/s", left) if x)


class Progress:
    """`add(n)` from any thread as bytes are done; `close()` ends the line."""

    def __init__(self, label: str, total: int, stream=None, clock=time.monotonic):
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.started = clock()
        self.done = 0
        self._drawn: Optional[float] = None
        self._lock = _thread.allocate_lock()  # threading's Lock, without importing threading
        try:
            self.live = self.stream.isatty()
        except (AttributeError, ValueError):
            self.live = False

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            if not self.live:
                return
            now = self.clock()
            if now - self.started < SHOW_AFTER_S:
                return
            if self._drawn is not None and now - self._drawn < REDRAW_EVERY_S:
                return
            self._drawn = now
            self.stream.write("\r\x1b[K" + line(self.label, self.done, self.total, now - self.started))
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self.live and self._drawn is not None:
                self.stream.write("\r\x1b[K" + line(self.label, self.done, self.total,
                                                    self.clock() - self.started) + "\n")
                self.stream.flush()
