"""Waiting for the local queue with inotify directly (a few ctypes calls, no thread): the runner's
`wait()` is a `select` on one fd, woken the moment a message lands in a queue folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from appliance.inotify import CLOSE_WRITE, CREATE, DELETE, IGNORED, ISDIR, MOVED_TO, ONLYDIR, Q_OVERFLOW, Inotify
from appliance.queues.local_layout import LOCK_NAME, is_local_queue


class _Inotify(Inotify):
    """Watches the queue root and every local* directory in it."""

    ROOT_MASK = CREATE | MOVED_TO | ONLYDIR
    QUEUE_MASK = CLOSE_WRITE | MOVED_TO | DELETE | ONLYDIR

    def __init__(self, root: Path):
        super().__init__()
        self.root = root
        self.wds: dict = {}  # wd -> queue name ("" for the root)
        self._add(root, "", self.ROOT_MASK)
        for q in sorted(os.listdir(root)):
            if is_local_queue(q):
                self._add(root / q, q, self.QUEUE_MASK)

    def _add(self, path: Path, queue: str, mask: int) -> None:
        wd = self.add(path, mask)
        if wd >= 0:
            self.wds[wd] = queue
        # a directory removed meanwhile is fine: its re-creation shows up on the root watch

    def read(self, blocked: set) -> bool:
        """Drain pending events; True if one of them may mean a claimable message.
        `blocked`: queues where a claim found the writers' lock; only there does the lock's
        removal matter."""
        wake = False
        for wd, mask, name in self.events():
            if mask & Q_OVERFLOW:
                wake = True
            elif mask & IGNORED:
                self.wds.pop(wd, None)
            elif self.wds.get(wd) == "":
                if mask & ISDIR and is_local_queue(name):
                    self._add(self.root / name, name, self.QUEUE_MASK)
                    wake = True  # files may have landed before the watch did
            elif name == LOCK_NAME:
                if mask & DELETE and self.wds.get(wd) in blocked:
                    blocked.discard(self.wds.get(wd))
                    wake = True  # the writer we waited for finished
            elif not name.startswith(".") and mask & (CLOSE_WRITE | MOVED_TO):
                wake = True
        return wake
