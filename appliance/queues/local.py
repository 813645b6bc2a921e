"""The local directory queue: StudioML's `local*` layout, shared by many runners on one box.

One piece, a little over 400 lines, on purpose: the claim, its recovery and the dead letters
share one protocol on one tree; its names, writer and watch live apart (local_layout,
local_write, local_inotify).

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

import errno
import os
import re
import select
import stat
import time
from pathlib import Path
from typing import Optional

from appliance.files import write_atomic
from appliance.queues.base import Claimed
from appliance.queues.local_inotify import _Inotify
from appliance.queues.local_layout import (  # noqa: F401 - the queue's names, where importers find them
    ATTEMPTS, CLAIMED, CLIENT_DIRS, DEAD, DEAD_TTL_S, LEASE_S, LOCK_NAME, RECOVER_EVERY_S, STALE_LOCK_S,
    SWEEP_DEAD_EVERY_S, _file_mode, _mkdir, is_local_queue, no_access, share_queue_tree)
from appliance.queues.local_write import (  # noqa: F401
    LockTimeout, QueueWriteError, enqueue, soft_lock)

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


# ---------------------------------------------------------------- the source

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
        # folder -> {name: (mtime_ns, size)} of its last listing: a message file is complete
        # and never changes once it is in the queue, so a deep queue is stat'ed once, not at
        # every claim (200 queued jobs: 20,000 stats otherwise)
        self._listed: dict = {}
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
        before = self._listed.get(folder, {})
        now: dict = {}
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.name == LOCK_NAME or e.name.startswith(".") or (
                            dead and e.name.endswith(".reason")) or not e.is_file(follow_symlinks=False):
                        continue
                    seen = before.get(e.name)
                    if seen is None:
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        seen = (st.st_mtime_ns, st.st_size)
                    if seen[1]:  # an empty one may still be being written: looked at again
                        now[e.name] = seen
                    out.append((seen[0], e.name, seen[1]))
        except FileNotFoundError:
            self._listed.pop(folder, None)
            return []
        self._listed[folder] = now
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
        write_atomic(path, f"{n}\n", sync=False)  # a kill never loses it; a power cut may (one more try)

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
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with open(fd, "w") as fh:
                os.fchmod(fd, mode)  # not the umask's
                fh.write(reason.rstrip("\n") + "\n")
            if msg.owner_uid is not None and os.geteuid() == 0:
                os.chown(tmp, msg.owner_uid, -1)  # the sender reads why (`queue dead`), no one else
            os.replace(tmp, reason_file)
        except OSError as e:  # a full disk: the message is dead-lettered all the same
            tmp.unlink(missing_ok=True)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
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

    def fileno(self) -> Optional[int]:
        """What to `select` on for new messages (None without inotify); then call `woken()`."""
        return self._notify.fd if self._notify is not None else None

    def woken(self) -> bool:
        """Read what the watch saw; True if a message may have arrived (spurious ones possible)."""
        return self._notify is not None and self._notify.read(self._blocked)

    def wait(self, timeout: float, wake_fd: Optional[int] = None) -> bool:
        """Sleep until a message may have arrived in any local queue, `wake_fd` is readable (a
        signal: left for the caller to read), or `timeout` passes.
        True if woken (spurious wake-ups are possible), False on timeout."""
        deadline = time.monotonic() + max(0.0, timeout)
        fds = [fd for fd in (self.fileno(), wake_fd) if fd is not None]
        if not fds:
            time.sleep(max(0.0, timeout))
            return False
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                ready, _, _ = select.select(fds, [], [], left)
            except InterruptedError:
                ready = []
            if self.fileno() in ready and self.woken():
                return True
            if wake_fd is not None and wake_fd in ready:
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
