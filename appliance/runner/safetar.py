"""Unpack an artifact tarball that a stranger built, without letting it write outside `dest`.

An experiment request names its own artifacts, so a tarball may be hostile: absolute names,
`..`, symlinks or hard links that lead out of the destination (also through a symlink that an
earlier member planted, or the long-path trick of CVE-2025-4517 that makes `os.path.realpath`
give up while the kernel keeps following links), device files, or simply more data than the
disk can take.

So no path string is ever resolved by the kernel from the root. Every member's folders are
walked one component at a time under directory descriptors opened with O_NOFOLLOW (`openat`),
and every file is created with O_CREAT|O_EXCL|O_NOFOLLOW under its folder's descriptor: nothing
is written through a symlink, whatever symlinks the archive made. Rules:

- names are relative, without `..`; a member whose folder is a symlink (one the archive made)
  is refused, as is one that replaces a folder;
- symlinks may be made when their target stays inside `dest` (read as a path, lexically): they
  are created, never followed here;
- hard links only to regular files this archive already wrote (found by the same walk);
- no devices or fifos; modes lose setuid/setgid/sticky and group/other write; owners are never
  taken from the archive (`owner=` gives everything to one uid:gid, e.g. the workload's);
- at most `max_bytes` of file data, counted as it is written (a header cannot lie its way
  past it), and at most `max_members` members.

On `UnsafeArchive` `dest` may hold the members before the bad one: extract into a fresh
directory and remove it on failure.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO, Optional, Union

CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeArchive(ValueError):
    """The archive tries something a workspace never needs; `member` names the culprit."""

    def __init__(self, member: str, why: str):
        super().__init__(f"unsafe archive member {member!r}: {why}")
        self.member = member


def _clean_name(name: str, member: str, what: str = "path") -> list:
    """`name` (of `member`) as its relative path components, or UnsafeArchive."""
    if "\0" in name:
        raise UnsafeArchive(member, f"{what} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeArchive(member, f"absolute {what} {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(member, f"{what} {name!r} has a '..' component")
    return parts


class _Tree:
    """`dest` as a directory descriptor, walked without following any link."""

    def __init__(self, dest: Path, owner: Optional[tuple]):
        self.fd = os.open(dest, _DIR_FLAGS)
        self.owner = owner

    def close(self) -> None:
        os.close(self.fd)

    def _chown(self, name: str, dir_fd: int) -> None:
        if self.owner is not None:
            os.chown(name, *self.owner, dir_fd=dir_fd, follow_symlinks=False)

    def folder(self, parts: list, member: str, create: bool = True) -> int:
        """A descriptor of the folder `parts` (made as needed); the caller closes it."""
        fd = os.dup(self.fd)
        try:
            for part in parts:
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise UnsafeArchive(member, f"refers to {'/'.join(parts)!r}, which is not in the "
                                                    "archive") from None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self._chown(part, fd)
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeArchive(member, f"its folder {'/'.join(parts)!r} is a link or a file, "
                                                    "not a folder (links are never followed: one could "
                                                    "lead outside)") from None
                    raise
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def clear(self, name: str, dir_fd: int, member: str) -> None:
        """Make room for a new entry `name`: never write through what is there."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeArchive(member, "replaces a directory")
        os.unlink(name, dir_fd=dir_fd)


def _inside(link_parent: list, target: str) -> bool:
    """Whether a symlink in folder `link_parent` pointing at `target` stays in the tree."""
    if target.startswith("/"):
        return False
    depth = len(link_parent)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        depth += -1 if part == ".." else 1
        if depth < 0:
            return False
    return True


def safe_extract(tar: Union[str, os.PathLike, BinaryIO], dest: Path, max_bytes: int,
                 max_members: int = 500_000, owner: Optional[tuple] = None) -> int:
    """Extract `tar` (a path, or a readable stream such as an S3 body) into `dest`.

    See the module doc for what is refused. `owner=(uid, gid)` gives every entry made to that
    user. Returns the bytes written."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if isinstance(tar, (str, os.PathLike)):
            tf = tarfile.open(tar, mode="r:*")
        else:
            tf = tarfile.open(fileobj=tar, mode="r|*")  # streams need not be seekable
    except (tarfile.TarError, EOFError) as e:
        raise UnsafeArchive("?", f"not a readable tar archive ({e})") from None
    tree = _Tree(dest, owner)
    written = 0
    count = 0
    try:
        with tf:
            for member in tf:
                count += 1
                if count > max_members:
                    raise UnsafeArchive(member.name, f"more than {max_members} members")
                parts = _clean_name(member.name, member.name)
                if not parts:
                    if member.isdir():
                        continue  # the "." entry of `tar -C dir -cf x .`
                    raise UnsafeArchive(member.name, "empty name")
                if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                    kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                            tarfile.FIFOTYPE: "fifo"}.get(member.type, f"type {member.type!r}")
                    raise UnsafeArchive(member.name, f"{kind} members are not allowed")
                if member.isreg() and written + member.size > max_bytes:
                    raise UnsafeArchive(member.name, f"archive unpacks to more than {max_bytes} bytes")
                written += _extract_one(tf, tree, member, parts, max_bytes - written)
    except (tarfile.TarError, EOFError) as e:
        raise UnsafeArchive(getattr(e, "member", "?"), f"not a readable tar archive ({e})") from None
    finally:
        tree.close()
    return written


def _extract_one(tf, tree: _Tree, member, parts: list, room: int) -> int:
    *folders, name = parts
    mode = member.mode & 0o755
    parent = tree.folder(folders, member.name)
    try:
        if member.isdir():
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
                tree._chown(name, parent)
            except FileExistsError:
                pass
            fd = tree.folder([name], member.name, create=False)
            try:
                os.fchmod(fd, mode | 0o700)
            finally:
                os.close(fd)
            return 0
        tree.clear(name, parent, member.name)
        if member.issym():
            if member.linkname.startswith("/"):
                raise UnsafeArchive(member.name, f"symlink to absolute path {member.linkname!r}")
            if not _inside(folders, member.linkname) or "\0" in member.linkname:
                raise UnsafeArchive(member.name, f"symlink leads outside: {member.linkname!r}")
            os.symlink(member.linkname, name, dir_fd=parent)
            tree._chown(name, parent)
            return 0
        if member.islnk():
            *tfolders, tname = _clean_name(member.linkname, member.name, "hard link target") or [""]
            if not tname:
                raise UnsafeArchive(member.name, "hard link to nothing")
            src = tree.folder(tfolders, member.name, create=False)
            try:
                try:
                    st = os.stat(tname, dir_fd=src, follow_symlinks=False)
                except FileNotFoundError:
                    raise UnsafeArchive(member.name, f"hard link to a missing file {member.linkname!r}") from None
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafeArchive(member.name, f"hard link to something not a file {member.linkname!r}")
                os.link(tname, name, src_dir_fd=src, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(src)
            return 0
        # a regular file: created here, never opened through a link
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=parent)
        written = 0
        try:
            source = tf.extractfile(member)
            while True:
                chunk = source.read(CHUNK) if source is not None else b""
                if not chunk:
                    break
                written += len(chunk)
                if written > room:
                    raise UnsafeArchive(member.name, "archive unpacks to more bytes than allowed")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            if tree.owner is not None:
                os.fchown(fd, *tree.owner)
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)
        return written
    finally:
        os.close(parent)
