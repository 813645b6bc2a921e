"""Writing a message into the local queue as the StudioML client does, but atomically (a temp file,
then a rename) and under the client's soft lock (`lock.lock`: whoever creates it holds it).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Optional

from appliance.queues.local_layout import LOCK_NAME, STALE_LOCK_S, _file_mode, _mkdir, is_local_queue

class LockTimeout(TimeoutError):
    pass


def uuid4() -> str:
    """A random UUID (version 4) as text, as str(uuid.uuid4()) makes it; without the uuid module,
    which brings platform and libuuid into every runner (~0.2 MB) for this one call."""
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40  # version 4
    b[8] = b[8] & 0x3F | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def enqueue(root: Path, queue: str, body: bytes, timeout: float = 10.0,
            stale_s: float = STALE_LOCK_S, owner_uid: Optional[int] = None) -> str:
    """Put a message on `queue` like the StudioML client does, but atomically (temp file then
    rename) and under the same soft lock; returns the message id (a uuid4, as the client's).
    `owner_uid` (root only: the API for a member): the file is that user's, 0600, so the
    job is theirs (its owner is the file's uid) and no one else in the group reads it."""
    if not is_local_queue(queue):
        raise ValueError(f"{queue!r} is not a local queue name (must start with 'local')")
    folder = Path(root) / queue
    if not folder.is_dir():
        _mkdir(folder)
        _same_owner(folder, os.stat(root))
    where = os.stat(folder)
    mode = _file_mode(where.st_mode) if owner_uid is None else 0o600
    msgid = uuid4()
    tmp = folder / f".{msgid}.tmp"
    try:
        with soft_lock(folder / LOCK_NAME, timeout=timeout, stale_s=stale_s):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                with open(fd, "wb") as fh:
                    os.fchmod(fd, mode)  # 0600, whatever the umask
                    if owner_uid is None:
                        _same_owner(tmp, where)
                    else:
                        os.chown(tmp, owner_uid, -1)
                    fh.write(body)
                    fh.flush()
                    os.fsync(fd)
                os.rename(tmp, folder / msgid)
            except BaseException:  # a full disk, Ctrl-C: no half message stays behind
                tmp.unlink(missing_ok=True)
                raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise QueueWriteError(f"cannot write to the queue at {folder}: "
                                  f"{os.strerror(e.errno).lower()}; free space there "
                                  f"(df -h {folder}) and submit again") from None
        raise
    return msgid


class QueueWriteError(OSError):
    """The queue's filesystem refused a new message (full, over quota); nothing was left."""


def _same_owner(path: Path, owner: os.stat_result) -> None:
    """What root (a `submit` run with sudo) makes belongs to the owner of the folder it is in, so
    runners that dropped to `isolation.user` can still claim and read it."""
    if os.geteuid() != 0 or (owner.st_uid, owner.st_gid) == (0, 0):
        return
    os.chown(path, owner.st_uid, owner.st_gid)  # a folder keeps its setgid bit


class soft_lock:
    """filelock.SoftFileLock's protocol: whoever creates the file (O_EXCL) holds the lock.
    A lock file older than `stale_s` is left by a dead writer and is broken."""

    def __init__(self, path: Path, timeout: float = 10.0, stale_s: float = STALE_LOCK_S):
        self.path, self.timeout, self.stale_s = Path(path), timeout, stale_s

    def __enter__(self):
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC,
                                 0o644))
                return self
            except FileExistsError:
                pass
            try:
                if time.time() - os.stat(self.path).st_mtime > self.stale_s:
                    os.unlink(self.path)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise LockTimeout(f"{self.path} is held by another writer "
                                  f"(remove it if no StudioML client is running)")
            time.sleep(0.01)

    def __exit__(self, *exc):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
