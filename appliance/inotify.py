"""Linux inotify through a few ctypes calls (no thread, no dependency): one fd to `select` on.

`Inotify` is the bare interface. `Watch` follows named files (through their folder) and whole
folder trees (their entries, at every depth, and the tree itself being made or removed), and
says which of them changed: what the controller and the runners wait on while idle, so that
they sleep until something happens instead of looking every fraction of a second.
Opening or reading a file is never an event here: readers do not wake anyone.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path
from typing import Optional

MODIFY = 0x2
ATTRIB = 0x4
CLOSE_WRITE = 0x8
MOVED_FROM = 0x40
MOVED_TO = 0x80
CREATE = 0x100
DELETE = 0x200
DELETE_SELF = 0x400
MOVE_SELF = 0x800
Q_OVERFLOW = 0x4000
IGNORED = 0x8000
ONLYDIR = 0x01000000
ISDIR = 0x40000000
ENTRIES = MOVED_FROM | MOVED_TO | CREATE | DELETE  # an entry of a folder made, replaced, gone
CHANGES = ENTRIES | CLOSE_WRITE | ATTRIB  # ... or edited
_EVENT = struct.Struct("iIII")

# the C library as this process has it (find_library would run `ldconfig -p` at every import)
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """One inotify instance: `add` watches, read the pending `events` (never blocks)."""

    def __init__(self):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")

    def fileno(self) -> int:
        return self.fd

    def add(self, path, mask: int) -> int:
        """The watch descriptor, or -1 when `path` is not there (or not a folder with ONLYDIR)."""
        return _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)

    def events(self) -> list[tuple[int, int, str]]:
        """Every pending event as (watch descriptor, mask, name); [] when none."""
        out = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            off = 0
            while off < len(buf):
                wd, mask, _cookie, size = _EVENT.unpack_from(buf, off)
                name = buf[off + _EVENT.size: off + _EVENT.size + size].rstrip(b"\0").decode(
                    errors="surrogateescape")
                off += _EVENT.size + size
                out.append((wd, mask, name))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Watch(Inotify):
    """Files and folder trees to follow; `changed()` names those that changed since it last asked.

    A file is watched itself (written in place) and through its folder's entries (an editor's
    atomic save replaces it: the new file is then watched). A tree is watched through its
    parent's entries (the tree made, removed or renamed), itself and every folder below it
    (watched as they appear). Parents are watched for entries only: files written in them (the
    home's job table, say) do not wake the watcher."""

    PARENT_MASK = ENTRIES | ONLYDIR
    FILE_MASK = CLOSE_WRITE
    TREE_MASK = CHANGES | MODIFY | DELETE_SELF | MOVE_SELF | ONLYDIR

    def __init__(self):
        super().__init__()
        self.files: dict[Path, list] = {}  # folder -> the files of it we follow
        self.trees: list[Path] = []
        self.wds: dict[int, Path] = {}  # watch descriptor -> the folder it watches
        self.overflowed = False

    def file(self, path: Path) -> None:
        path = Path(path)
        self.files.setdefault(path.parent, []).append(path)
        self._add(path.parent, self.PARENT_MASK)
        self._add(path, self.FILE_MASK)

    def tree(self, path: Path) -> None:
        path = Path(path)
        self.trees.append(path)
        self._add(path.parent, self.PARENT_MASK)
        self._add_tree(path)

    def _add(self, folder: Path, mask: int) -> None:
        wd = self.add(folder, mask)
        if wd >= 0:
            self.wds[wd] = folder
        # a folder not there (yet) is fine: its parent sees it come, or a fallback check does

    def _add_tree(self, root: Path) -> None:
        self._add(root, self.TREE_MASK)
        try:
            with os.scandir(root) as it:
                subdirs = [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        for sub in subdirs:
            self._add_tree(sub)

    def _tree_of(self, path: Path) -> Optional[Path]:
        for root in self.trees:
            if path == root or root in path.parents:
                return root
        return None

    def changed(self) -> set[Path]:
        """The watched files and tree roots touched since the last call (all of them after an
        event queue overflow)."""
        out: set[Path] = set()
        for wd, mask, name in self.events():
            if mask & Q_OVERFLOW:
                self.overflowed = True
                out |= {f for fs in self.files.values() for f in fs} | set(self.trees)
                continue
            folder = self.wds.get(wd)
            if mask & IGNORED:
                self.wds.pop(wd, None)
                continue
            if folder is None:
                continue
            path = folder / name if name else folder  # a watched file's own events have no name
            if path in self.files.get(folder, ()) or path in self.files.get(path.parent, ()):
                out.add(path)
                if name and mask & (CREATE | MOVED_TO):
                    self._add(path, self.FILE_MASK)  # the file replaced: watch the new one
            root = self._tree_of(path)
            if root is None:
                continue
            out.add(root)
            if mask & ISDIR and mask & (CREATE | MOVED_TO):
                self._add_tree(path)  # a new folder (or the tree itself, made again): watch it
        return out
