"""The local queue's layout and who may use it: StudioML's `local*` queue names, the folders of
ours beside the client's (`.claimed`, `.dead`, `.attempts`), and the tree's ownership and modes
(`share_queue_tree`). The queue itself is `local.py`; writing a message, `local_write.py`.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from pathlib import Path
from typing import Optional

from appliance.paths import SHARED_GROUP, shared_gid

LOCK_NAME = "lock.lock"
CLAIMED = ".claimed"
DEAD = ".dead"
ATTEMPTS = ".attempts"
STALE_LOCK_S = 60.0
LEASE_S = 15 * 60.0
RECOVER_EVERY_S = 30.0
DEAD_TTL_S = 30 * 86400.0
SWEEP_DEAD_EVERY_S = 600.0

_QUEUE_NAME = re.compile(r"local[A-Za-z0-9_.\-]*")


def is_local_queue(name: str) -> bool:
    """StudioML routes a queue name starting with `local` to the directory queue."""
    return isinstance(name, str) and _QUEUE_NAME.fullmatch(name) is not None


SHARED_DIR_MODE, PRIVATE_DIR_MODE = 0o3770, 0o700
CLIENT_DIRS = ("queue", "experiments", "blobcache", "artifact_mappings")  # what the client makes


def no_access(path: Path, group: str = SHARED_GROUP) -> str:
    """What to tell a user the queue tree keeps out."""
    return (f"{path}: permission denied: the queue is for the '{group}' group; join it "
            f"(`sudo usermod -aG {group} $USER`, then log in again) or use sudo")


def _mkdir(path: Path) -> None:
    """`mkdir -p` whose new folders take their parent's group access (setgid, sticky), never others'."""
    if path.is_dir():
        return
    _mkdir(path.parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    mode = 0o700 | (os.stat(path.parent).st_mode & 0o3070)
    os.chmod(path, mode)
    if mode & 0o070:
        _files_stay_their_owners(path)


# A default ACL of owner, group and others with no bits for the group or others: a file made in
# the folder (a StudioML client's message, written with its umask: 0644) is its maker's alone.
_OWNER_ONLY_DEFAULT_ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in ((0x01, 7), (0x04, 0), (0x20, 0)))


def _files_stay_their_owners(folder) -> None:
    """Give the shared `folder` the default ACL above (no ACLs on this filesystem: files keep
    their maker's umask, and `share_queue_tree` closes them at the next `up`)."""
    try:
        os.setxattr(folder, "system.posix_acl_default", _OWNER_ONLY_DEFAULT_ACL, follow_symlinks=False)
    except OSError:
        pass


def _file_mode(folder_mode: int) -> int:
    """Every file in the queue tree is its owner's alone (0600), whoever may use the folder: a
    message carries its sender's store key."""
    return 0o600


def share_queue_tree(top: Path, group: str = SHARED_GROUP) -> Optional[str]:
    """Give `top` (HOME/studioml: the queue, and what the StudioML client writes beside it) to
    `group`: folders 3770 (setgid, sticky), files their owner's alone (0600), nothing for others:
    a StudioML client of the group drops its message there (its own file), no member reads,
    replaces or deletes another's. Without the group everything is the owner's alone (0700, 0600).

    Walks the tree only when `top` is not right yet (a first `up`, an older home); otherwise it
    looks at the folders directly in `top` and in its queue root, which a client may have made
    with its umask. Returns what it changed, for the caller to say; None when all was right."""
    top = Path(top)
    gid = shared_gid(group)
    if gid is not None and os.geteuid() != 0 and gid not in os.getgroups():
        gid = None  # we may not hand files to it
    top.mkdir(parents=True, exist_ok=True)
    if _wrong(top, gid):
        changed = _fix_tree(top, gid)
    else:
        changed = 0
        for folder in (top, top / "queue"):
            try:
                entries = [e.path for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                continue
            changed += sum(_fix_tree(Path(p), gid) for p in entries if _wrong(Path(p), gid))
    for name in CLIENT_DIRS:
        _mkdir(top / name)
    if not changed:
        return None
    if gid is None:
        return (f"{top}: no group '{group}', so the queue is root's alone (0700/0600; "
                f"`groupadd --system {group}` or ./install.sh lets its members submit without sudo)")
    return f"{top}: queue folders 3770 and files 0600, group '{group}' ({changed} entries changed)"


def _wrong(path: Path, gid: Optional[int]) -> bool:
    st = os.lstat(path)
    want = SHARED_DIR_MODE if gid is not None else PRIVATE_DIR_MODE
    return (st.st_mode & 0o7777) != want or (gid is not None and st.st_gid != gid)


def _fix_tree(top: Path, gid: Optional[int]) -> int:
    """Set group and modes below `top` (see share_queue_tree); how many entries changed."""
    changed = 0
    for folder, dirs, files in os.walk(top):
        for path in [folder] + [os.path.join(folder, n) for n in dirs + files]:
            try:
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    continue
                if stat.S_ISDIR(st.st_mode):
                    mode = SHARED_DIR_MODE if gid is not None else PRIVATE_DIR_MODE
                    if gid is not None:
                        _files_stay_their_owners(path)
                else:
                    mode = st.st_mode & 0o700  # a message is its sender's alone (it holds their key)
                if gid is not None and st.st_gid != gid:
                    os.chown(path, -1, gid, follow_symlinks=False)
                elif (st.st_mode & 0o7777) == mode:
                    continue
                os.chmod(path, mode)  # after chown, which may clear setgid
                changed += 1
            except (FileNotFoundError, PermissionError):
                continue  # gone meanwhile, or someone else's (not run as root)
    return changed
