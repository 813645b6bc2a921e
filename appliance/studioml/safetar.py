"""Unpack an artifact tarball that a stranger built, without letting it write outside `dest`.

An experiment request names its own artifacts, so a tarball may be hostile: absolute names,
`..`, symlinks or hard links that lead out of the destination, device files, lying headers, or
simply more data than the disk can take. Checking paths with `os.path.realpath` is not enough:
realpath gives up on paths longer than PATH_MAX while the kernel keeps following the links
(CVE-2025-4517 and kin), and Python's own `filter="data"` had the same hole. So no member path
is ever handed to the kernel as a string from the root. The rules:

- Every member path is walked from `dest` one component at a time under a directory file
  descriptor, each folder opened with O_NOFOLLOW; missing folders are made. A folder that is a
  symlink (planted by an earlier member, or already in `dest`) is refused: nothing is ever
  written through a link, even one that stays inside.
- A name that already exists is unlinked and made anew (files with O_CREAT|O_EXCL|O_NOFOLLOW),
  never written through; a directory is never replaced by anything else.
- Symlinks may be made: relative targets whose '..' parts all come first and do not climb above
  `dest` from the link's folder (`../../lib/x`, not `a/../b`, not `/usr/x`). As that folder is a
  real directory, this is exact, and each link made here leads inside whatever the names after
  the '..' later turn out to be.
- Hard links only to regular files this call extracted (same inode), found by the same walk.
- Regular files are streamed in chunks. The byte limit counts the declared sizes before writing
  and the bytes actually written; negative sizes are refused.
- Modes are sanitized (no setuid/setgid/sticky, no group/other write, the owner may read and
  write; directories keep owner rwx); mtimes are kept. The owner never comes from the tar: it
  is the caller, or `owner=` (a root runner handing the tree to the workload's uid).

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

_CHUNK = 1 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SPECIAL = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo"}


class UnsafeArchive(ValueError):
    """The archive tries something a workspace never needs; `member` names the culprit."""

    def __init__(self, member: str, why: str):
        super().__init__(f"unsafe archive member {member!r}: {why}")
        self.member = member


class TooBig(UnsafeArchive):
    """The archive holds more file data than it may unpack to."""


class _Missing(Exception):
    """A folder on a path to look up (not to make) does not exist."""


def _clean_name(name: str, member: str, what: str = "path") -> list[str]:
    """`name` (of `member`) as its relative components, or UnsafeArchive."""
    if "\0" in name:
        raise UnsafeArchive(member, f"{what} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeArchive(member, f"absolute {what} {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(member, f"{what} {name!r} has a '..' component")
    return parts


def _check_symlink_target(target: str, depth: int, member: str) -> None:
    """Refuse a symlink target that could resolve outside, for a link `depth` folders below dest."""
    if "\0" in target:
        raise UnsafeArchive(member, "symlink target contains a NUL byte")
    if target.startswith("/"):
        raise UnsafeArchive(member, f"symlink to absolute path {target!r}")
    if not target:
        raise UnsafeArchive(member, "symlink with an empty target")
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = next((i for i, p in enumerate(parts) if p != ".."), len(parts))
    if ".." in parts[ups:]:
        raise UnsafeArchive(member, f"symlink target {target!r} has a '..' after a name; "
                                    "only leading '..' are allowed")
    if ups > depth:
        raise UnsafeArchive(member, f"symlink leads outside: {target!r}")


def _lstat(name: str, dir_fd: int) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _set_mtime(name_or_fd, mtime, **kw) -> None:
    try:
        os.utime(name_or_fd, (mtime, mtime), **kw)
    except (OSError, OverflowError, ValueError):
        pass  # an absurd timestamp is not worth refusing the archive for (tarfile ignores it too)


class _Tree:
    """`dest` as a directory fd, and the walk below it that never follows a link."""

    def __init__(self, dest: Path, owner: Optional[tuple[int, int]]):
        self.root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.owner = owner
        self.files: set[tuple[int, int]] = set()  # (dev, ino) of regular files extracted here
        self._last: tuple[tuple[str, ...], int] = ((), os.dup(self.root))  # the last folder walked to

    def close(self) -> None:
        os.close(self._last[1])
        os.close(self.root)

    def chown(self, name: str, dir_fd: int) -> None:
        if self.owner is not None:
            os.chown(name, *self.owner, dir_fd=dir_fd, follow_symlinks=False)

    def folder(self, parts: list[str], member: str, what: str = "its folder", create: bool = True) -> int:
        """An fd of the directory dest/parts (the caller must not close it; it stays valid until the
        next call). Each component is opened with O_NOFOLLOW: a symlink is refused, a missing folder
        is made when `create`, else _Missing."""
        key = tuple(parts)
        if key == self._last[0]:
            return self._last[1]
        fd = os.dup(self.root)
        try:
            for i, part in enumerate(parts):
                try:
                    nxt = os.open(part, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise _Missing() from None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self.chown(part, fd)
                    nxt = os.open(part, _DIR, dir_fd=fd)
                except OSError:
                    st = _lstat(part, fd)
                    where = "/".join(parts[:i + 1])
                    if st is not None and stat.S_ISLNK(st.st_mode):
                        raise UnsafeArchive(member, f"{what} {where!r} is a symlink; nothing is written or "
                                                    "linked through symlinks (one could lead outside dest)") from None
                    if st is not None and not stat.S_ISDIR(st.st_mode):
                        raise UnsafeArchive(member, f"{what} {where!r} is not a directory") from None
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        os.close(self._last[1])
        self._last = (key, fd)
        return fd

    def clear(self, name: str, dir_fd: int, member: str) -> None:
        """Remove what is at `name` so a new entry is made there, never written through."""
        st = _lstat(name, dir_fd)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeArchive(member, "replaces a directory")
        os.unlink(name, dir_fd=dir_fd)
        if st.st_nlink == 1:
            self.files.discard((st.st_dev, st.st_ino))  # gone: its number may be reused


def safe_extract(tar: Union[str, os.PathLike, BinaryIO], dest: Path, max_bytes: int,
                 max_members: int = 500_000, *, owner: Optional[tuple[int, int]] = None) -> int:
    """Extract `tar` (a path, or a readable stream such as an S3 body) into `dest`.

    Refuses absolute paths, `..`, links leading outside `dest` or through symlinks, device/fifo
    members, more than `max_bytes` of file data or more than `max_members` members. With `owner`
    (uid, gid) every file, folder and symlink made is chowned to it (`dest` itself is left alone).
    Returns the bytes written.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if isinstance(tar, (str, os.PathLike)):
            tf = tarfile.open(tar, mode="r:*")
        else:
            tf = tarfile.open(fileobj=tar, mode="r|*")  # streams need not be seekable
    except (tarfile.TarError, EOFError) as e:
        raise UnsafeArchive("?", f"not a readable tar archive ({e})") from None
    with tf:
        tree = _Tree(dest, owner)
        try:
            return _extract_all(tf, tree, max_bytes, max_members)
        finally:
            tree.close()


def _extract_all(tf: tarfile.TarFile, tree: _Tree, max_bytes: int, max_members: int) -> int:
    total = 0
    dirs = []  # (parts, mode, mtime) of folder members, set once their contents are in
    name = "?"  # the member being read, for errors
    try:
        for count, member in enumerate(tf, 1):
            name = member.name
            if count > max_members:
                raise UnsafeArchive(name, f"more than {max_members} members")
            if member.size < 0:
                raise UnsafeArchive(name, f"negative size {member.size} in its header")
            parts = _clean_name(name, name)
            if not parts:
                if member.isdir():
                    continue  # the "." entry of `tar -C dir -cf x .`
                raise UnsafeArchive(name, "empty name")
            try:
                if member.isreg():
                    if total + member.size > max_bytes:
                        raise TooBig(name, f"archive unpacks to more than {max_bytes} bytes")
                    total = _file(tf, member, parts, tree, total, max_bytes)
                elif member.isdir():
                    _dir(member, parts, tree)
                    dirs.append((parts, member.mode, member.mtime))
                elif member.issym():
                    _check_symlink_target(member.linkname, len(parts) - 1, name)
                    _symlink(member, parts, tree)
                elif member.islnk():
                    _hardlink(member, parts, tree)
                else:
                    kind = _SPECIAL.get(member.type, f"type {member.type!r}")
                    raise UnsafeArchive(name, f"{kind} members are not allowed")
            except OSError as e:
                if e.errno == errno.ENAMETOOLONG:  # the archive's doing, not the disk's
                    raise UnsafeArchive(name, "a name or link target longer than the filesystem "
                                              "allows") from None
                raise OSError(e.errno, f"{e.strerror} (unpacking archive member {name!r})") from e
            name = "?"  # a broken header after this member is not its fault
    except (tarfile.TarError, EOFError) as e:
        raise UnsafeArchive(name, f"not a readable tar archive ({e})") from None
    for parts, mode, mtime in reversed(dirs):  # after their contents, which change the mtime
        fd = tree.folder(parts, "/".join(parts))
        if tree.owner is not None:
            os.fchown(fd, *tree.owner)
        os.fchmod(fd, mode & 0o755 | 0o700)
        _set_mtime(fd, mtime)
    return total


def _file(tf: tarfile.TarFile, member: tarfile.TarInfo, parts: list[str], tree: _Tree,
          total: int, max_bytes: int) -> int:
    """Stream a regular member into a new file; returns `total` plus the bytes written."""
    parent = tree.folder(parts[:-1], member.name)
    tree.clear(parts[-1], parent, member.name)
    fd = os.open(parts[-1], _NEW_FILE, 0o600, dir_fd=parent)
    try:
        src = tf.extractfile(member)
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise TooBig(member.name, f"archive unpacks to more than {max_bytes} bytes")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        if tree.owner is not None:
            os.fchown(fd, *tree.owner)
        mode = member.mode & 0o755 | 0o600
        if not mode & stat.S_IXUSR:
            mode &= ~0o111
        os.fchmod(fd, mode)
        _set_mtime(fd, member.mtime)
        st = os.fstat(fd)
        tree.files.add((st.st_dev, st.st_ino))
    finally:
        os.close(fd)
    return total


def _dir(member: tarfile.TarInfo, parts: list[str], tree: _Tree) -> None:
    parent = tree.folder(parts[:-1], member.name)
    st = _lstat(parts[-1], parent)
    if st is not None and stat.S_ISDIR(st.st_mode):
        return
    tree.clear(parts[-1], parent, member.name)  # a file or link named like the folder: replaced
    os.mkdir(parts[-1], 0o700, dir_fd=parent)
    tree.chown(parts[-1], parent)


def _symlink(member: tarfile.TarInfo, parts: list[str], tree: _Tree) -> None:
    parent = tree.folder(parts[:-1], member.name)
    tree.clear(parts[-1], parent, member.name)
    os.symlink(member.linkname, parts[-1], dir_fd=parent)
    tree.chown(parts[-1], parent)
    _set_mtime(parts[-1], member.mtime, dir_fd=parent, follow_symlinks=False)


def _hardlink(member: tarfile.TarInfo, parts: list[str], tree: _Tree) -> None:
    """A second name for a regular file this archive extracted; its mode and owner are that file's."""
    name, target = member.name, member.linkname
    src = _clean_name(target, name, "hard link target")
    if not src:
        raise UnsafeArchive(name, "hard link with an empty target")
    try:
        src_dir = os.dup(tree.folder(src[:-1], name, f"hard link target {target!r}: its folder",
                                     create=False))
    except _Missing:
        raise UnsafeArchive(name, f"hard link to a missing file {target!r}") from None
    try:
        st = _lstat(src[-1], src_dir)
        if st is None:
            raise UnsafeArchive(name, f"hard link to a missing file {target!r}")
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeArchive(name, f"hard link to {target!r}, which is not a regular file")
        if (st.st_dev, st.st_ino) not in tree.files:
            raise UnsafeArchive(name, f"hard link to {target!r}, a file not extracted by this archive "
                                      "(it could be a link to a file outside dest)")
        parent = tree.folder(parts[:-1], name)
        here = _lstat(parts[-1], parent)
        if here is not None and (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
            return  # already that file
        tree.clear(parts[-1], parent, name)
        os.link(src[-1], parts[-1], src_dir_fd=src_dir, dst_dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(src_dir)
