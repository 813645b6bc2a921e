"""What the controller watches on disk: the credentials directory (its whole tree) and the home's
appliance.toml, with inotify (appliance/inotify.py, no thread). A change only stamps a time; the
controller's loop does the work once it has been quiet for `controller.debounce`. The loop's
sleep is one `select` on the watch and a pipe, so a change or a stop ends it at once and nothing
wakes the controller while nothing happens.
"""

from __future__ import annotations

import logging
import os
import select
import time
from pathlib import Path
from typing import Optional

from appliance.inotify import Watch as Inotify
from appliance.paths import Home

log = logging.getLogger("appliance.controller")


class Watch:
    """inotify on the credentials directory (its tree, and its parent: it may be deleted and
    made again) and on appliance.toml (through the home: editors save by rename)."""

    def __init__(self, home: Home, creds: Path):
        self.home, self.creds = home, creds
        self.creds_changed_at: Optional[float] = None
        self.config_changed_at: Optional[float] = None
        self.inotify: Optional[Inotify] = None
        # a byte written here (by stop() in a signal handler) ends the loop's sleep
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def start(self) -> None:
        try:
            self.inotify = Inotify()
        except OSError as e:
            log.warning("cannot watch %s and %s (%s); looking at them at each tick only",
                        self.creds, self.home.config_file, e)
            return
        self.inotify.file(self.home.config_file)
        self.inotify.tree(self.creds)

    def _read(self) -> bool:
        """Stamp what the watch saw since the last look (never blocks); True if anything."""
        changed = self.inotify.changed() if self.inotify is not None else ()
        if changed:
            self.touched(changed)
        return bool(changed)

    def touched(self, paths) -> None:
        now = time.monotonic()
        for p in paths:
            p = Path(p)
            if p == self.home.config_file:
                self.config_changed_at = now
            elif p == self.creds or self.creds in p.parents:
                self.creds_changed_at = now

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # woken already

    def due(self, debounce: float) -> float:
        """When the oldest change not yet taken is quiet long enough (monotonic; inf: none)."""
        self._read()
        stamps = [t for t in (self.creds_changed_at, self.config_changed_at) if t is not None]
        return min(stamps) + debounce if stamps else float("inf")

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`; a change of appliance.toml or the credentials, or wake(), ends
        it at once (other events of the watched folders put it back to sleep)."""
        deadline = time.monotonic() + max(0.0, seconds)
        fds = [self._wake_r] + ([self.inotify.fd] if self.inotify is not None else [])
        while True:
            try:
                ready = select.select(fds, [], [], max(0.0, deadline - time.monotonic()))[0]
            except InterruptedError:
                ready = [self._wake_r]  # a signal: its handler may have asked to stop
            if self._wake_r in ready:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                return
            if not ready or self._read() or time.monotonic() >= deadline:
                return

    def take(self, debounce: float) -> tuple[bool, bool]:
        """(credentials changed, config changed), each once quiet for `debounce` seconds."""
        self._read()
        now = time.monotonic()
        creds = self.creds_changed_at is not None and now - self.creds_changed_at >= debounce
        config = self.config_changed_at is not None and now - self.config_changed_at >= debounce
        if creds:
            self.creds_changed_at = None
        if config:
            self.config_changed_at = None
        return creds, config

    def stop(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None
