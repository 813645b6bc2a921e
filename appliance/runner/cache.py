"""A byte-bounded, least-recently-used on-disk cache of immutable artifacts, by key.

Immutable artifacts (the `workspace` tar at `blobstore/<sha256>.tar`, datasets) never change
under one key, so a runner that saw a key before does not download it again.

Layout: `ROOT/<sha256 of the key>.blob` holds the object as downloaded (the tar, not its
unpacked tree: unpacking again is cheap and goes through the safe extractor every time);
its mtime is the last use. Several runners share one cache directory:

- inserting is atomic: the object is written to `ROOT/tmp/` and renamed into place, so a
  reader sees a whole blob or none; two runners inserting the same key write the same bytes.
- `open()` hands back an open file: eviction by another runner unlinks the name, the open
  file stays readable. A blob gone between lookup and open is simply a miss.
- eviction runs under an fcntl lock on `ROOT/.lock` so two evictors do not both delete.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

from appliance.sha256 import sha256


class ArtifactCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.tmp = self.root / "tmp"
        self.stats = {"hits": 0, "misses": 0, "hit_bytes": 0, "miss_bytes": 0}  # for /metrics
        if os.geteuid() == 0 and self.root.is_dir():
            os.chmod(self.root, 0o700)  # other tenants' workspaces: never a workload's to read

    def _path(self, key: str) -> Path:
        return self.root / (sha256(key.encode()).hexdigest() + ".blob")

    def open(self, key: str) -> Optional[BinaryIO]:
        """The cached object for `key`, opened for reading, or None on a miss."""
        path = self._path(key)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        try:
            os.utime(path)  # mark as used now
        except OSError:
            pass
        return f

    def __contains__(self, key: str) -> bool:
        return self._path(key).exists()

    @contextmanager
    def insert(self, key: str) -> Iterator[Path]:
        """`with cache.insert(key) as tmp: download into tmp` then it becomes the entry.

        If the body raises, nothing is inserted. An object bigger than the whole cache is not
        kept (the caller still has `tmp` inside the block).
        """
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{os.urandom(16).hex()}.part"
        try:
            yield tmp
            size = tmp.stat().st_size
            if size <= self.max_bytes:
                os.replace(tmp, self._path(key))
                self.evict()
        finally:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass

    def fill(self, key: str, download: Callable[[Path], None]) -> BinaryIO:
        """Open `key` from the cache, calling `download(path)` to fetch it on a miss."""
        f = self.open(key)
        if f is not None:
            self.stats["hits"] += 1
            self.stats["hit_bytes"] += os.fstat(f.fileno()).st_size
            return f
        with self.insert(key) as tmp:
            download(tmp)
            f = open(tmp, "rb")  # stays readable even if not kept or evicted at once
        self.stats["misses"] += 1
        self.stats["miss_bytes"] += os.fstat(f.fileno()).st_size
        return f

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every entry, oldest first."""
        out = []
        try:
            it = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for e in it:
            if not e.name.endswith(".blob"):
                continue
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, Path(e.path)))
        out.sort()
        return out

    def size(self) -> int:
        return sum(s for _, s, _ in self.entries())

    def evict(self) -> int:
        """Delete least recently used entries until the cache fits; returns bytes freed."""
        self.root.mkdir(parents=True, exist_ok=True)
        freed = 0
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self.entries()
            total = sum(s for _, s, _ in entries)
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                try:
                    path.unlink()
                    freed += size
                except FileNotFoundError:
                    pass
                total -= size
        return freed
