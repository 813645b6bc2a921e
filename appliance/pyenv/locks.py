"""The lock files builds, jobs and eviction take: in a folder only root can open.

A lock a workload can open is a lock a workload can hold: flock needs no write access, so a
world-readable lock file lets any tenant take LOCK_EX and stall every build and job that
waits for it. The locks of the venv cache and the uv cache live in one folder beside them
(`HOME/cache/locks`), root's and 0700 (made so again at every use), never in the venv
folder, which workloads must traverse.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO


def private_dir(path: Path) -> Path:
    """`path` as a folder only its owner (root, when we are root) can enter; made if missing."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a folder")
    if os.geteuid() == 0 and (st.st_uid != 0 or st.st_gid != 0):
        os.chown(path, 0, 0)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def open_lock(folder: Path, name: str) -> IO:
    """The lock file `folder/name` (0600, in a private folder), opened for flock."""
    fd = os.open(private_dir(folder) / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "r+b", buffering=0)
