"""Waiting for the local queue with inotify directly (a few ctypes calls, no thread): the runner's
`wait()` is a `select` on one fd, woken the moment a message lands in a queue folder.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

from appliance.queues.local_layout import LOCK_NAME, is_local_queue

_IN_CLOSE_WRITE = 0x8
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_IN_ISDIR = 0x40000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")

# the C library as this process has it (find_library would run `ldconfig -p` at every import)
_libc = ctypes.CDLL(None, use_errno=True)


class _Inotify:
    """Watches the queue root and every local* directory in it."""

    ROOT_MASK = _IN_CREATE | _IN_MOVED_TO | _IN_ONLYDIR
    QUEUE_MASK = _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_DELETE | _IN_ONLYDIR

    def __init__(self, root: Path):
        self.fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.root = root
        self.wds: dict = {}  # wd -> queue name ("" for the root)
        self._add(root, "", self.ROOT_MASK)
        for q in sorted(os.listdir(root)):
            if is_local_queue(q):
                self._add(root / q, q, self.QUEUE_MASK)

    def _add(self, path: Path, queue: str, mask: int) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd >= 0:
            self.wds[wd] = queue
        # a directory removed meanwhile is fine: its re-creation shows up on the root watch

    def read(self, blocked: set) -> bool:
        """Drain pending events; True if one of them may mean a claimable message.
        `blocked`: queues where a claim found the writers' lock; only there does the lock's
        removal matter."""
        wake = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return wake
            off = 0
            while off < len(buf):
                wd, mask, _cookie, size = _EVENT.unpack_from(buf, off)
                name = buf[off + _EVENT.size: off + _EVENT.size + size].rstrip(b"\0").decode(
                    errors="surrogateescape")
                off += _EVENT.size + size
                if mask & _IN_Q_OVERFLOW:
                    wake = True
                elif mask & _IN_IGNORED:
                    self.wds.pop(wd, None)
                elif self.wds.get(wd) == "":
                    if mask & _IN_ISDIR and is_local_queue(name):
                        self._add(self.root / name, name, self.QUEUE_MASK)
                        wake = True  # files may have landed before the watch did
                elif name == LOCK_NAME:
                    if mask & _IN_DELETE and self.wds.get(wd) in blocked:
                        blocked.discard(self.wds.get(wd))
                        wake = True  # the writer we waited for finished
                elif not name.startswith(".") and mask & (_IN_CLOSE_WRITE | _IN_MOVED_TO):
                    wake = True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
