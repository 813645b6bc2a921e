"""The one uv cache every build shares.

Installed by uv (`installer="uv"`, the default) from one shared uv cache (`UvCache`,
HOME/cache/uv), linked into the venv (`clone` where the filesystem copies on write, else
`hardlink`: cache and venvs must share a filesystem, `appliance doctor` checks). The cache's
safety rule: **only root writes the uv cache, and uv runs there only with `--no-build`**, so
no package code runs while it is written (a wheel is unpacked, never executed; the
requirement set is plain specifiers, so uv fetches from the admin's index only). The cache
is 0700 root; a workload reaches its files only through a sealed venv, where a hard link is
the same root-owned, read-only inode (sealing chowns to root and drops group/other write,
which the cached inode already is, so the cache stays as uv left it). uv locks its cache
for concurrent builds; our own lock (`uv.lock` in the private lock folder, locks.py:
builds shared, eviction exclusive) keeps eviction away from a running build.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Iterable, Optional

from appliance.pyenv.locks import open_lock
from appliance.pyenv.requirements import canonical_name


def uv_binary() -> Optional[str]:
    """The uv executable the `uv` wheel ships, or None: beside this interpreter, where the wheel
    puts it in a venv (asking the wheel imports sysconfig, ~0.2 MB more in every runner)."""
    beside = os.path.join(os.path.dirname(sys.executable), "uv")
    if os.access(beside, os.X_OK):
        return beside
    try:
        import uv
        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        return None


_FICLONE = 0x40049409


def reflinks(folder: Path) -> bool:
    """Whether files in `folder` can be cloned (copy on write, e.g. btrfs, XFS)."""
    try:
        with tempfile.TemporaryFile(dir=folder) as a, tempfile.TemporaryFile(dir=folder) as b:
            a.write(b"x")
            a.flush()
            fcntl.ioctl(b.fileno(), _FICLONE, a.fileno())
        return True
    except OSError:
        return False


def _disk_bytes(path: Path) -> int:
    """Bytes `path` takes on disk, each inode once (hard links)."""
    seen, total = set(), 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


SYSTEM_CONFIG = Path("/etc/uv/uv.toml")


class UvCache:
    """The one uv cache every build shares (see the module docstring for its safety rule).

    Bounded to `max_bytes`: after a build, the packages used least recently (a marker file per
    package in `<root>.used/`, its mtime the last use) are removed with `uv cache clean <name>`
    until the cache fits, never one the build just used. Eviction takes `<locks>/uv.lock`
    exclusively (non-blocking: a busy cache is trimmed after a later build); builds hold it
    shared."""

    def __init__(self, root: Path, max_bytes: int = 20 << 30, uv: Optional[str] = None,
                 locks: Optional[Path] = None, system_config: Path = SYSTEM_CONFIG):
        self.root = Path(root)
        self.system_config = Path(system_config)
        self.locks = Path(locks) if locks is not None else self.root.parent / "locks"
        self.max_bytes = int(max_bytes)
        self.uv = uv or uv_binary()
        self.used_dir = self.root.with_name(self.root.name + ".used")
        self._mode: Optional[str] = None

    def ensure(self) -> None:
        self.root.with_name(self.root.name + ".lock").unlink(missing_ok=True)  # an earlier layout's
        for d in (self.root, self.used_dir):
            d.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(d, 0, 0)
                os.chmod(d, 0o700)

    def config_args(self, env: dict) -> list[str]:
        """uv's settings come from the admin only: `UV_*` in `env`, UV_CONFIG_FILE if set
        there, else the system's uv.toml; never a uv.toml or pyproject.toml that uv would
        find in a folder above the build (a workload may write one there), nor root's own."""
        if "UV_CONFIG_FILE" in env or not self.system_config.is_file():
            return ["--no-config"]
        return ["--no-config", "--config-file", str(self.system_config)]

    def link_mode(self) -> str:
        if self._mode is None:
            self.ensure()
            self._mode = "clone" if reflinks(self.root) else "hardlink"
        return self._mode

    def lock(self, how: int, block: bool = True) -> Optional[IO]:
        f = open_lock(self.locks, "uv.lock")
        try:
            fcntl.flock(f, how | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return None
        return f

    def used(self, names: Iterable[str]) -> None:
        now = time.time()
        for name in names:
            marker = self.used_dir / canonical_name(name)
            marker.touch()
            os.utime(marker, (now, now))

    def size(self) -> int:
        return _disk_bytes(self.root)

    def evict(self, keep: Iterable[str] = (), env: Optional[dict] = None) -> list[str]:
        """Remove least recently used packages until the cache fits; the names removed."""
        if self.size() <= self.max_bytes:
            return []
        lock = self.lock(fcntl.LOCK_EX, block=False)
        if lock is None:
            return []
        keep = {canonical_name(k) for k in keep}
        removed = []
        with lock:
            markers = sorted(self.used_dir.iterdir(), key=lambda p: p.stat().st_mtime)
            for marker in markers:
                if marker.name in keep:
                    continue
                subprocess.run([self.uv, "cache", "clean", *self.config_args(env or {}), "--cache-dir",
                                str(self.root), "--", marker.name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, timeout=600)
                marker.unlink(missing_ok=True)
                removed.append(marker.name)
                if self.size() <= self.max_bytes:
                    break
        return removed
