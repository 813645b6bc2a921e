"""Unpack an artifact tarball that a stranger built, without letting it write outside `dest`.

An experiment request names its own artifacts, so a tarball may be hostile: absolute names,
`..`, symlinks or hard links that lead out of the destination (also through a symlink that an
earlier member planted), device files, or simply more data than the disk can take. Every member
is checked against the tree as it is on disk at that moment (realpath), before it is written.
Python's own `filter="data"` runs as well, as a second fence; on its own it is not enough on
older 3.11/3.12 patch releases (the 2025 tarfile filter bypasses).

On `UnsafeArchive` `dest` may hold the members before the bad one: extract into a fresh
directory and remove it on failure.
"""

from __future__ import annotations

import copy
import os
import tarfile
from pathlib import Path
from typing import BinaryIO, Union

_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
_FILTER_ERROR = getattr(tarfile, "FilterError", ())


class UnsafeArchive(ValueError):
    """The archive tries something a workspace never needs; `member` names the culprit."""

    def __init__(self, member: str, why: str):
        super().__init__(f"unsafe archive member {member!r}: {why}")
        self.member = member


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _clean_name(name: str, member: str, what: str = "path") -> str:
    """`name` (of `member`) as a relative path, or UnsafeArchive."""
    if "\0" in name:
        raise UnsafeArchive(member, f"{what} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeArchive(member, f"absolute {what} {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(member, f"{what} {name!r} has a '..' component")
    return "/".join(parts)


def safe_extract(tar: Union[str, os.PathLike, BinaryIO], dest: Path, max_bytes: int,
                 max_members: int = 500_000) -> int:
    """Extract `tar` (a path, or a readable stream such as an S3 body) into `dest`.

    Refuses absolute paths, `..`, links leading outside `dest`, device/fifo members, more than
    `max_bytes` of file data or more than `max_members` members. Returns the bytes written.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    try:
        if isinstance(tar, (str, os.PathLike)):
            tf = tarfile.open(tar, mode="r:*")
        else:
            tf = tarfile.open(fileobj=tar, mode="r|*")  # streams need not be seekable
    except (tarfile.TarError, EOFError) as e:
        raise UnsafeArchive("?", f"not a readable tar archive ({e})") from None
    total = 0
    count = 0
    with tf:
        try:
            for member in tf:
                count += 1
                if count > max_members:
                    raise UnsafeArchive(member.name, f"more than {max_members} members")
                name = _clean_name(member.name, member.name)
                if not name:
                    if member.isdir():
                        continue  # the "." entry of `tar -C dir -cf x .`
                    raise UnsafeArchive(member.name, "empty name")
                target = os.path.join(root, name)
                parent = os.path.realpath(os.path.dirname(target))
                if not _inside(parent, root):
                    raise UnsafeArchive(member.name, "its folder is a link leading outside")

                if member.isreg():
                    total += member.size
                    if total > max_bytes:
                        raise UnsafeArchive(member.name,
                                            f"archive unpacks to more than {max_bytes} bytes")
                elif member.issym():
                    if member.linkname.startswith("/"):
                        raise UnsafeArchive(member.name,
                                            f"symlink to absolute path {member.linkname!r}")
                    to = os.path.realpath(os.path.join(parent, member.linkname))
                    if not _inside(to, root):
                        raise UnsafeArchive(member.name,
                                            f"symlink leads outside: {member.linkname!r}")
                elif member.islnk():
                    link = _clean_name(member.linkname, member.name, "hard link target")
                    to = os.path.realpath(os.path.join(root, link))
                    if not _inside(to, root):
                        raise UnsafeArchive(member.name,
                                            f"hard link leads outside: {member.linkname!r}")
                    if not os.path.isfile(to):
                        raise UnsafeArchive(member.name,
                                            f"hard link to a missing file {member.linkname!r}")
                elif not member.isdir():
                    kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                            tarfile.FIFOTYPE: "fifo"}.get(member.type, f"type {member.type!r}")
                    raise UnsafeArchive(member.name, f"{kind} members are not allowed")

                # Never write through something already there (a planted link, an old file).
                if not member.isdir() and os.path.lexists(target):
                    if os.path.isdir(target) and not os.path.islink(target):
                        raise UnsafeArchive(member.name, "replaces a directory")
                    os.unlink(target)
                clean = copy.copy(member)
                clean.name = name
                clean.mode &= 0o755  # no setuid/setgid/sticky, no group/other write
                clean.uid, clean.gid = os.getuid(), os.getgid()  # never chown to the tar's ids
                clean.uname = clean.gname = ""
                try:
                    tf.extract(clean, root, set_attrs=True, numeric_owner=True, **_FILTER)
                except _FILTER_ERROR as e:  # the stdlib fence caught what we did not
                    raise UnsafeArchive(member.name, str(e)) from None
        except (tarfile.TarError, EOFError) as e:
            raise UnsafeArchive(getattr(e, "member", "?"),
                                f"not a readable tar archive ({e})") from None
    return total
