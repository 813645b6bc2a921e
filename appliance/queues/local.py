"""The local directory queue: StudioML's `local*` layout, shared by many runners on one box.

Layout (what the `studioml` client writes, see STUDIOML.md): `root/<queue>/<uuid4>`, one JSON
file per message, `root` being `$STUDIOML_HOME/queue`. The client writes a message in place
(open, write, close) while it holds the *soft* lock `root/<queue>/lock.lock` (its existence is
the lock). So a reader must not take a file while the lock exists, or it may read half a message.

Everything else is ours and lives in dot-folders the client never looks at:

    root/.claimed/<queue>/<msgid>@<runner>@<pid>.<starttime>.<pidns>   being run
    root/.dead/<queue>/<msgid>  (+ <msgid>.reason)                      never to run again
    root/.attempts/<queue>/<msgid>                                      claims so far ("2\n")

Claiming is one atomic `rename` into `.claimed`, so two runners never get the same message.
Each claim then writes (and fsyncs) the message's claim count in `.attempts` before the runner
gets it, so the count survives a runner that crashes mid-job and its claim being recovered;
release keeps it (the message file itself stays as the client wrote it), ack and dead-letter
remove it.
A claim records who holds it; `recover_orphans` returns claims whose process is gone (pid plus
its start time, so a reused pid does not count as alive). Claims from another pid namespace
(a runner in a container) cannot be checked that way: they count as orphaned when their file
has not been touched by `keepalive` for `lease_s`.

Waiting uses inotify directly (a few ctypes calls, no thread): `wait()` is a `select` on one fd.

Messages hold store keys, so the tree is not for everyone: `share_queue_tree` gives its folders
to the `appliance` group (3770: setgid, so what is made inside takes the group; sticky, so a
member deletes or renames only their own messages), or, without that group, to its owner alone
(0700). Every file in it is its owner's alone (0600): a member's message carries their own store
key, and its owner (the job's) is the file's uid. Folders made here take their parent folder's
group access and never give others any. Dead letters older than `dead_ttl_s`
are deleted by a sweep that runs at most every `SWEEP_DEAD_EVERY_S`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import select
import stat
import struct
import time
import uuid
from pathlib import Path
from typing import Optional

from appliance.files import write_atomic
from appliance.paths import SHARED_GROUP, shared_gid
from appliance.queues.base import Claimed

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


# ---------------------------------------------------------------- who may read the queue

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


# ---------------------------------------------------------------- process identity

def _pidns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _starttime(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot, None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] == b"Z":  # a zombie has finished its work
        return None
    return int(fields[19])


def _owner_tag(runner_id: str) -> str:
    pid = os.getpid()
    return f"{runner_id}@{pid}.{_starttime(pid) or 0}.{_pidns()}"


def _owner_alive(tag: str, mtime: float, lease_s: float) -> bool:
    try:
        _runner, proc = tag.rsplit("@", 1)
        pid, start, ns = (int(x) for x in proc.split("."))
    except ValueError:
        return time.time() - mtime < lease_s  # not ours: fall back to the lease
    if ns != _pidns():
        return time.time() - mtime < lease_s
    return _starttime(pid) == start


# ---------------------------------------------------------------- inotify

_IN_CLOSE_WRITE = 0x8
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_IN_ISDIR = 0x40000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class _Inotify:
    """Watches the queue root and every local* directory in it."""

    ROOT_MASK = _IN_CREATE | _IN_MOVED_TO | _IN_ONLYDIR
    QUEUE_MASK = _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_DELETE | _IN_ONLYDIR

    def __init__(self, root: Path):
        self.fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.root = root
        self.wds: dict = {}  # wd -> queue name ("" for the root)
        self._add(root, "", self.ROOT_MASK)
        for q in sorted(os.listdir(root)):
            if is_local_queue(q):
                self._add(root / q, q, self.QUEUE_MASK)

    def _add(self, path: Path, queue: str, mask: int) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd >= 0:
            self.wds[wd] = queue
        # a directory removed meanwhile is fine: its re-creation shows up on the root watch

    def read(self, blocked: set) -> bool:
        """Drain pending events; True if one of them may mean a claimable message.
        `blocked`: queues where a claim found the writers' lock; only there does the lock's
        removal matter."""
        wake = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return wake
            off = 0
            while off < len(buf):
                wd, mask, _cookie, size = _EVENT.unpack_from(buf, off)
                name = buf[off + _EVENT.size: off + _EVENT.size + size].rstrip(b"\0").decode(
                    errors="surrogateescape")
                off += _EVENT.size + size
                if mask & _IN_Q_OVERFLOW:
                    wake = True
                elif mask & _IN_IGNORED:
                    self.wds.pop(wd, None)
                elif self.wds.get(wd) == "":
                    if mask & _IN_ISDIR and is_local_queue(name):
                        self._add(self.root / name, name, self.QUEUE_MASK)
                        wake = True  # files may have landed before the watch did
                elif name == LOCK_NAME:
                    if mask & _IN_DELETE and self.wds.get(wd) in blocked:
                        blocked.discard(self.wds.get(wd))
                        wake = True  # the writer we waited for finished
                elif not name.startswith(".") and mask & (_IN_CLOSE_WRITE | _IN_MOVED_TO):
                    wake = True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------- the source

class LockTimeout(TimeoutError):
    pass


class LocalQueueSource:
    """`QueueSource` over `root/<local*>/<msg>` directories (see the module doc)."""

    name = "local"

    def __init__(self, root: Path, runner_id: str = "runner", lease_s: float = LEASE_S,
                 stale_lock_s: float = STALE_LOCK_S, watch: bool = True,
                 dead_ttl_s: float = DEAD_TTL_S):
        """`watch=False` for readers that never `wait()` (the CLI): no inotify, no mkdir.
        `dead_ttl_s`: dead letters older than this are deleted (0: kept forever)."""
        self.root = Path(root)
        self.runner_id = re.sub(r"[^A-Za-z0-9_.\-]", "_", runner_id) or "runner"
        self.lease_s = lease_s
        self.stale_lock_s = stale_lock_s
        self.dead_ttl_s = dead_ttl_s
        self._tag = _owner_tag(self.runner_id)
        self._held: dict = {}  # claimed path -> Claimed
        self._notify: Optional[_Inotify] = None
        self._last_recover = 0.0
        self._last_sweep = 0.0
        self._blocked: set = set()  # queues whose last claim met the writers' lock
        if watch:
            # Watch from the start, so a message landing between a runner's empty claim and
            # its first wait() still wakes it.
            _mkdir(self.root)
            try:
                self._notify = _Inotify(self.root)
            except OSError:
                self._notify = None  # no inotify (limits, odd filesystem): wait() just sleeps

    # -- reading the layout

    def queues(self) -> list:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_local_queue(n) and (self.root / n).is_dir())

    def _messages(self, folder: Path, dead: bool = False) -> list:
        """Message files in `folder`, oldest first (mtime, then name): the client's FIFO."""
        out = []
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.name == LOCK_NAME or e.name.startswith(".") or (
                            dead and e.name.endswith(".reason")):
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if e.is_file(follow_symlinks=False):
                        out.append((st.st_mtime_ns, e.name, st.st_size))
        except FileNotFoundError:
            return []
        out.sort()
        return out

    def depths(self) -> dict:
        return {q: len(self._messages(self.root / q)) for q in self.queues()}

    def dead_counts(self) -> dict:
        dead = self.root / DEAD
        if not dead.is_dir():
            return {}
        return {q: len(self._messages(dead / q, dead=True)) for q in sorted(os.listdir(dead))}

    def claimed_counts(self) -> dict:
        claimed = self.root / CLAIMED
        if not claimed.is_dir():
            return {}
        return {q: len(self._messages(claimed / q)) for q in sorted(os.listdir(claimed))}

    def dead_letters(self) -> list:
        """(queue, message id, reason) of every dead-lettered message, oldest first."""
        dead = self.root / DEAD
        out = []
        for q in sorted(os.listdir(dead)) if dead.is_dir() else []:
            for _mtime, name, _size in self._messages(dead / q, dead=True):
                try:
                    reason = (dead / q / f"{name}.reason").read_text().strip()
                except FileNotFoundError:
                    reason = "(no reason recorded)"
                except PermissionError:
                    reason = "(someone else's)"
                out.append((q, name, reason))
        return out

    def locked(self, queue: str) -> bool:
        """True while a writer holds the queue's soft lock (a lock older than
        `stale_lock_s` belongs to a writer that died and is ignored)."""
        try:
            age = time.time() - os.stat(self.root / queue / LOCK_NAME).st_mtime
        except FileNotFoundError:
            return False
        return age < self.stale_lock_s

    # -- QueueSource

    def claim(self, queue: str, prefer: tuple = ()) -> Optional[Claimed]:
        """The oldest message (FIFO), or the first of `prefer` (message ids, the job table's
        fair-share order) still waiting."""
        if not is_local_queue(queue):
            raise ValueError(f"{queue!r} is not a local queue name (must start with 'local')")
        now = time.monotonic()
        if now - self._last_recover > RECOVER_EVERY_S:
            self.recover_orphans()
        if now - self._last_sweep > SWEEP_DEAD_EVERY_S:
            self.sweep_dead()
        folder = self.root / queue
        if self.locked(queue):
            self._blocked.add(queue)
            return None
        candidates = self._messages(folder)
        # A file listed now was complete unless its writer still holds the lock: check again.
        if candidates and self.locked(queue):
            self._blocked.add(queue)
            return None
        self._blocked.discard(queue)
        if prefer:
            rank = {name: i for i, name in enumerate(prefer)}
            candidates.sort(key=lambda c: rank.get(c[1], len(rank)))  # stable: FIFO after them
        dest_dir = self.root / CLAIMED / queue
        _mkdir(dest_dir)
        now_ns = time.time_ns()
        for mtime_ns, name, size in candidates:
            if size == 0 and now_ns - mtime_ns < 2e9:
                continue  # a lock-less writer may still be writing it
            dest = dest_dir / f"{name}@{self._tag}"
            try:
                os.rename(folder / name, dest)
            except FileNotFoundError:
                continue  # another runner was faster
            st = os.lstat(dest)
            if not stat.S_ISREG(st.st_mode):
                # a file its writer swapped for a link (or a folder) after the listing: it would read,
                # and take the owner of, whatever it points at; it is nobody's message
                if stat.S_ISDIR(st.st_mode):
                    os.rename(dest, folder / name)
                else:
                    os.unlink(dest)
                continue
            try:
                body = _read_no_follow(dest)
                attempt = self._attempts(queue, name) + 1
                self._set_attempts(queue, name, attempt)  # counted before anyone works on it
            except OSError:
                os.rename(dest, folder / name)  # not readable or countable by us: leave it for others
                raise
            msg = Claimed(source=self.name, queue=queue, message_id=name, body=body, handle=dest,
                          attempt=attempt, owner_uid=st.st_uid)  # who wrote it (the kernel's word): its owner
            self._held[dest] = msg
            return msg
        return None

    def _attempts(self, queue: str, msgid: str) -> int:
        try:
            return max(0, int((self.root / ATTEMPTS / queue / msgid).read_text().strip()))
        except FileNotFoundError:
            return 0
        except ValueError:
            return 0  # not written by us (we replace it whole): count afresh

    def _set_attempts(self, queue: str, msgid: str, n: int) -> None:
        path = self.root / ATTEMPTS / queue / msgid
        if n <= 0:
            path.unlink(missing_ok=True)
            return
        write_atomic(path, f"{n}\n", durable=True)

    def keepalive(self, msg: Claimed) -> None:
        """Touch the claim: its mtime is the lease seen from other pid namespaces."""
        try:
            os.utime(msg.handle)
        except FileNotFoundError:
            pass

    def ack(self, msg: Claimed) -> None:
        self._held.pop(msg.handle, None)
        try:
            os.unlink(msg.handle)
        except FileNotFoundError:
            pass
        self._set_attempts(msg.queue, msg.message_id, 0)

    def release(self, msg: Claimed, counted: bool = True) -> None:
        """Back into the queue under its own name; rename keeps the mtime, hence its place.
        `counted=False` takes this claim off the message's count."""
        self._held.pop(msg.handle, None)
        if not counted:
            self._set_attempts(msg.queue, msg.message_id, msg.attempt - 1)
        folder = self.root / msg.queue
        _mkdir(folder)
        try:
            os.rename(msg.handle, folder / msg.message_id)
        except FileNotFoundError:
            pass

    def refuse(self, msg: Claimed, record: dict) -> None:
        """The local queue is this box's alone (runners dead-letter what no slot can run): a
        refusal only gives the claim back, uncounted."""
        self.release(msg, counted=False)

    def depth(self, queue: str) -> Optional[int]:
        return len(self._messages(self.root / queue))

    def dead_letter(self, msg: Claimed, reason: str) -> None:
        self._held.pop(msg.handle, None)
        folder = self.root / DEAD / msg.queue
        _mkdir(folder)
        mode = _file_mode(os.stat(folder).st_mode)
        reason_file = folder / f"{msg.message_id}.reason"
        tmp = folder / f".{msg.message_id}.reason.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with open(fd, "w") as fh:
            os.fchmod(fd, mode)  # not the umask's
            fh.write(reason.rstrip("\n") + "\n")
        if msg.owner_uid is not None and os.geteuid() == 0:
            os.chown(tmp, msg.owner_uid, -1)  # the sender reads why (`queue dead`), no one else
        os.replace(tmp, reason_file)
        dest = folder / msg.message_id
        try:
            os.rename(msg.handle, dest)
        except FileNotFoundError:
            self._set_attempts(msg.queue, msg.message_id, 0)
            return
        self._set_attempts(msg.queue, msg.message_id, 0)
        try:
            os.utime(dest)  # its age counts from now for dead_ttl_s
            os.chmod(dest, os.stat(dest).st_mode & mode)  # a client's 0644 file: no longer others'
        except OSError:
            pass  # not ours to change (another user wrote it); the folder keeps others out

    def close(self) -> None:
        for msg in list(self._held.values()):
            self.release(msg)
        if self._notify:
            self._notify.close()
            self._notify = None

    # -- orphans, expired dead letters and waiting

    def sweep_dead(self) -> int:
        """Delete dead letters (and reasons) older than `dead_ttl_s`; how many files went."""
        self._last_sweep = time.monotonic()
        dead = self.root / DEAD
        if not self.dead_ttl_s or not dead.is_dir():
            return 0
        cutoff_ns = time.time_ns() - int(self.dead_ttl_s * 1e9)
        removed = 0
        for queue in os.listdir(dead):
            try:
                with os.scandir(dead / queue) as it:
                    old = [e.path for e in it if not e.name.startswith(".")
                           and e.is_file(follow_symlinks=False)
                           and e.stat(follow_symlinks=False).st_mtime_ns < cutoff_ns]
            except (FileNotFoundError, NotADirectoryError):
                continue
            for path in old:
                try:
                    os.unlink(path)
                    removed += 1
                except FileNotFoundError:
                    pass  # another runner swept it first
        return removed

    def recover_orphans(self) -> int:
        """Return claims whose runner is gone to their queue; how many moved."""
        self._last_recover = time.monotonic()
        claimed = self.root / CLAIMED
        moved = 0
        if not claimed.is_dir():
            return 0
        for queue in os.listdir(claimed):
            for mtime_ns, name, _size in self._messages(claimed / queue):
                parts = name.rsplit("@", 2)
                if len(parts) != 3:
                    continue  # not a claim this code made: leave it to a human
                msgid, tag = parts[0], "@".join(parts[1:])
                if _owner_alive(tag, mtime_ns / 1e9, self.lease_s):
                    continue
                _mkdir(self.root / queue)
                try:
                    os.rename(claimed / queue / name, self.root / queue / msgid)
                    moved += 1
                except FileNotFoundError:
                    pass  # another runner recovered it first
        return moved

    def wait(self, timeout: float) -> bool:
        """Sleep until a message may have arrived in any local queue, or `timeout` passes.
        True if woken by the filesystem (spurious wake-ups are possible), False on timeout."""
        deadline = time.monotonic() + max(0.0, timeout)
        if self._notify is None:
            time.sleep(max(0.0, timeout))
            return False
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                ready, _, _ = select.select([self._notify.fd], [], [], left)
            except InterruptedError:
                ready = []
            if ready and self._notify.read(self._blocked):
                return True
            if time.monotonic() >= deadline:
                return False

    # -- writing (what `appliance submit` and tests use)

    def enqueue(self, queue: str, body: bytes, timeout: float = 10.0) -> str:
        return enqueue(self.root, queue, body, timeout=timeout, stale_s=self.stale_lock_s)


def _read_no_follow(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with open(fd, "rb") as fh:
        return fh.read()


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
    msgid = str(uuid.uuid4())
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
