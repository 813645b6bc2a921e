"""What the controller watches on disk: the credentials directory (recursive) and the home's
appliance.toml, through watchdog. The handler only stamps times; the controller's loop does the
work once a change has been quiet for `controller.debounce`, and a change (or a stop) ends the
loop's sleep at once through a pipe.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from pathlib import Path
from typing import Optional

from appliance.paths import Home

log = logging.getLogger("appliance.controller")


class Watch:
    """watchdog on the credentials directory (recursive) and the home (appliance.toml); the
    handler only stamps times, the controller's loop does the work after the debounce."""

    def __init__(self, home: Home, creds: Path):
        self.home, self.creds = home, creds
        self.lock = threading.Lock()
        self.creds_changed_at: Optional[float] = None
        self.config_changed_at: Optional[float] = None
        self.observer = None
        self.creds_watch = None
        self._creds_existed = False
        # a byte written here (by a change, or by stop() in a signal handler) ends the loop's sleep
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def start(self) -> None:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError as e:  # pragma: no cover - watchdog is a dependency
            log.warning("watchdog not available (%s); polling only", e)
            return
        watch = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.event_type in ("opened", "closed_no_write"):
                    return
                paths = [Path(event.src_path)]
                if getattr(event, "dest_path", ""):
                    paths.append(Path(event.dest_path))  # atomic saves arrive as moves
                watch.touched(paths)

        self.handler = Handler()
        self.observer = Observer()
        parents = {self.home.root, self.creds.parent}
        for parent in parents:
            if parent.is_dir():
                self.observer.schedule(self.handler, str(parent), recursive=False)
        self.observer.daemon = True
        self.observer.start()
        self.ensure_creds_watch()

    def ensure_creds_watch(self) -> None:
        """(Re)watch the credentials directory: it may be deleted and made again."""
        if self.observer is None:
            return
        exists = self.creds.is_dir()
        if exists and not self._creds_existed:
            try:
                if self.creds_watch is not None:
                    self.observer.unschedule(self.creds_watch)
            except (KeyError, ValueError):
                pass
            try:
                self.creds_watch = self.observer.schedule(self.handler, str(self.creds), recursive=True)
            except OSError as e:
                log.warning("cannot watch %s: %s", self.creds, e)
                return
        self._creds_existed = exists

    def touched(self, paths) -> None:
        now = time.monotonic()
        with self.lock:
            for p in paths:
                if p == self.home.config_file:
                    self.config_changed_at = now
                elif p == self.creds or self.creds in p.parents:
                    self.creds_changed_at = now
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # woken already

    def due(self, debounce: float) -> float:
        """When the oldest change not yet taken is quiet long enough (monotonic; inf: none)."""
        with self.lock:
            stamps = [t for t in (self.creds_changed_at, self.config_changed_at) if t is not None]
        return min(stamps) + debounce if stamps else float("inf")

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`; a change in a watched folder ends it at once."""
        try:
            select.select([self._wake_r], [], [], max(0.0, seconds))
        except InterruptedError:
            pass
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def take(self, debounce: float) -> tuple[bool, bool]:
        """(credentials changed, config changed), each once quiet for `debounce` seconds."""
        now = time.monotonic()
        with self.lock:
            creds = self.creds_changed_at is not None and now - self.creds_changed_at >= debounce
            config = self.config_changed_at is not None and now - self.config_changed_at >= debounce
            if creds:
                self.creds_changed_at = None
            if config:
                self.config_changed_at = None
        return creds, config

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=2)
