"""Small file helpers shared by every module that writes state."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str, mode: int | None = None, durable: bool = False,
                 sync: bool = True) -> None:
    """Write `text` to `path` so readers see the old or the new file, never half of one.
    `durable`: the rename itself survives a power cut too (the folder is synced). `sync=False`
    (records a power cut may lose, never a kill: a job's attempt count, a running ledger
    record): the text is not forced to the disk before the rename. A failure (a full disk)
    leaves no half-written temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            fh = open(tmp, "w")
        except FileNotFoundError:  # its folder is missing: made on the first write only
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(tmp, "w")
        with fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(text)
            fh.flush()
            if sync or durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
