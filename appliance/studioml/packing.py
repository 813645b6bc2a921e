"""Packing and unpacking artifact directories: the tar format StudioML's client reads and writes.

We write what the `studioml` client writes: a plain (uncompressed) tar whose members are the
directory's entries by relative name; we read any tar (`r:*`: the client may compress), through
the safe extractor (safetar.py) with a byte bound. `fingerprint` tells whether a directory
changed since its last upload.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
import threading
from pathlib import Path
from typing import Optional


def unpack(tar_file, dest: Path, max_bytes: int) -> int:
    """Extract a tar (a path or an open file; any compression) into `dest` through the safe
    extractor; a hostile or broken archive raises UnsafeArchive. Returns the bytes written."""
    from appliance.studioml.safetar import safe_extract
    return safe_extract(tar_file, dest, max_bytes)


def pack_into(src: Path, out, only_uid: Optional[int] = None) -> int:
    """Write a plain tar of the directory `src` (members named relative to it, as the client
    writes them) to the binary stream `out`; returns how many files were left out.

    The directory may belong to a workload that is still running, and the runner reading it is
    root: the walk goes through directory descriptors (os.fwalk) and opens every file with
    O_NOFOLLOW, so a file or folder swapped for a symlink never makes it read outside `src`.
    With `only_uid`, regular files owned by anyone else (a hard link to a file the workload
    could not read itself) are left out."""
    skipped = 0
    with tarfile.open(fileobj=out, mode="w|") as tar:
        try:
            top = os.lstat(src)
        except FileNotFoundError:
            return 0
        if not stat.S_ISDIR(top.st_mode):
            return 0
        for dirpath, dirnames, filenames, dirfd in os.fwalk(src, follow_symlinks=False):
            rel = os.path.relpath(dirpath, src)
            for name in sorted(dirnames + filenames):
                arcname = name if rel == "." else f"{rel}/{name}"
                try:
                    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        ti = tarfile.TarInfo(arcname)
                        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, st.st_mode & 0o7777, int(st.st_mtime)
                        tar.addfile(ti)
                    elif stat.S_ISLNK(st.st_mode):
                        ti = tarfile.TarInfo(arcname)
                        ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dirfd)
                        ti.mode, ti.mtime = 0o777, int(st.st_mtime)
                        tar.addfile(ti)
                    elif stat.S_ISREG(st.st_mode):
                        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
                        with os.fdopen(fd, "rb") as f:
                            fst = os.fstat(f.fileno())
                            if not stat.S_ISREG(fst.st_mode) or (only_uid is not None and fst.st_uid != only_uid):
                                skipped += 1
                                continue
                            ti = tar.gettarinfo(arcname=arcname, fileobj=f)
                            ti.uid = ti.gid = 0
                            ti.uname = ti.gname = ""
                            tar.addfile(ti, f)
                    else:
                        skipped += 1  # fifo, socket, device: nothing to keep
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        raise
                    skipped += 1  # gone, or swapped for a link while we looked
    return skipped


class PackedStream(io.RawIOBase):
    """The read end of a pipe a thread packs `src` into; a failure of the packer surfaces as an
    exception at the end of the stream (never as a short, truncated tar in the store)."""

    def __init__(self, src: Path, only_uid: Optional[int]):
        super().__init__()
        r, w = os.pipe()
        self._r = r
        self._error: list = []
        self.skipped = 0

        def produce() -> None:
            try:
                with os.fdopen(w, "wb", buffering=1 << 20) as out:
                    self.skipped = pack_into(src, out, only_uid)
            except BrokenPipeError:
                pass  # the reader gave up (the upload failed): it has its own error
            except BaseException as e:  # noqa: B036 - handed to the reader
                self._error.append(e)

        self._thread = threading.Thread(target=produce, name="pack", daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = os.read(self._r, len(buf))
        if not data:
            self._thread.join()
            if self._error:
                raise self._error[0]
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._r)
            self._thread.join()
        super().close()


def pack(src: Path, tar_path: Path, only_uid: Optional[int] = None) -> int:
    """A tar of `src` in the file `tar_path` (see pack_into)."""
    with open(tar_path, "wb") as out:
        return pack_into(src, out, only_uid)


def fingerprint(src: Path) -> tuple:
    """What changes when a directory's content changes (names, sizes, mtimes)."""
    out = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            out.append((os.path.relpath(p, src), st.st_size, st.st_mtime_ns))
    return tuple(out)
