"""A pipe that signals write to (`signal.set_wakeup_fd`): an idle runner selects on it beside its
queues, so a SIGTERM ends the longest idle wait at once, without waking up to look."""

from __future__ import annotations

import os
import select
import signal


class SignalWake:
    def __init__(self):
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)  # main thread only

    def sleep(self, timeout: float) -> bool:
        """Sleep up to `timeout`; True if a signal came."""
        try:
            return bool(select.select([self.fd], [], [], max(0.0, timeout))[0])
        except InterruptedError:
            return True

    def clear(self) -> None:
        try:
            while os.read(self.fd, 512):
                pass
        except BlockingIOError:
            pass
