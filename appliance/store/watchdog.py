"""Whether the bundled store can still write, and when it must be restarted to write again.

SeaweedFS's filer keeps its metadata in leveldb, and leveldb, once a write of its journal
failed (`filerldb/000001.log: no space left on device`), refuses every later write until it
is reopened: after a full disk the store stays broken although space came back. The store's
wrapper (appliance/store/sandbox.py) therefore watches, every CHECK_EVERY_S seconds, two cheap
signs that cost the store nothing while it rests: the free space of its data folder and the
new lines of its log. After either says "full", and once there is room again, it proves a
write (a small file put into the filer and deleted, over the filer's private socket); if that
fails, it restarts the store.

The same folder's free space tells `status`, `doctor` and `/metrics` that the store cannot
write because the disk is full (`disk_full_problem`).
"""

from __future__ import annotations

import os
import socket
import time

MiB = 1024 * 1024
FULL_BYTES = 1 * MiB  # under this free, the store's writes fail (or soon will)
ROOM_BYTES = 16 * MiB  # free again: time to prove a write
CHECK_EVERY_S = 2.0
STARTUP_S = 20.0  # a store just (re)started gets this long before a failed probe counts
ENOSPC_TEXT = b"no space left on device"
PROBE_PATH = "/.appliance/probe"


def free_bytes(path) -> int:
    """Bytes an unprivileged writer may still use on `path`'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def disk_full_problem(path) -> str | None:
    """'store cannot write: disk full (...)' while `path`'s filesystem is full, else None."""
    try:
        free = free_bytes(path)
    except OSError:
        return None  # not here (an external store, a home not made yet): nothing to say
    if free >= FULL_BYTES:
        return None
    return (f"store cannot write: disk full ({free // 1024} KiB free on the filesystem of {path}); "
            "free space there: the store writes again by itself within a minute")


def _unix_http(path: str, timeout: float):
    """An HTTP connection over the unix socket `path` (http.client is imported only when a
    write is proved: the store's wrapper stays small while it rests)."""
    import http.client

    class UnixHTTP(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(path)

    return UnixHTTP("localhost", timeout=timeout)


def probe_filer(filer_socket: str, timeout: float = 5.0) -> str | None:
    """Put a small file into the filer and delete it; None when both worked, else what failed."""
    name = f"{PROBE_PATH}/watchdog-{os.getpid()}"
    try:
        for method, body, ok in (("PUT", b"probe", (200, 201)), ("DELETE", None, (200, 202, 204, 404))):
            conn = _unix_http(filer_socket, timeout)
            try:
                conn.request(method, name, body=body)
                response = conn.getresponse()
                text = response.read(300).decode(errors="replace").strip()
            finally:
                conn.close()
            if response.status not in ok:
                return f"{method} into the filer answered {response.status} {text}"
    except OSError as e:
        return f"the filer at {filer_socket} does not answer: {e}"
    return None


def should_probe(hurt: bool, free: int, since_start_s: float) -> bool:
    """Prove a write when the disk was full (or the store logged ENOSPC), there is room again,
    and the store has had time to start."""
    return hurt and free >= ROOM_BYTES and since_start_s >= STARTUP_S


class Watchdog:
    """One instance per store wrapper; `tick` says when to restart the store."""

    def __init__(self, data_dir: str, filer_socket: str, log_fd: int | None = 1, say=print):
        self.data_dir, self.filer_socket, self.say = data_dir, filer_socket, say
        self.hurt = False  # the store may have failed a write since it last proved one
        self.started = time.monotonic()
        self._log = self._open_log(log_fd)

    @staticmethod
    def _open_log(fd: int | None):
        """A second, read-only handle on the log this process writes to (a regular file), at its end."""
        if fd is None:
            return None
        try:
            fh = open(f"/proc/self/fd/{fd}", "rb")  # noqa: SIM115 - lives as long as the watchdog
            if not os.path.isfile(f"/proc/self/fd/{fd}"):
                fh.close()
                return None
            fh.seek(0, os.SEEK_END)
            return fh
        except OSError:
            return None

    def _log_says_full(self) -> bool:
        if self._log is None:
            return False
        try:
            size = os.fstat(self._log.fileno()).st_size
            if size < self._log.tell():
                self._log.seek(0)  # truncated
            elif size - self._log.tell() > MiB:
                self._log.seek(size - MiB)
            return ENOSPC_TEXT in self._log.read()
        except OSError:
            return False

    def restarted(self) -> None:
        self.started = time.monotonic()

    def tick(self) -> bool:
        """Look once; True when the store cannot write although there is room: restart it."""
        try:
            free = free_bytes(self.data_dir)
        except OSError:
            return False
        if free < FULL_BYTES or self._log_says_full():
            if not self.hurt:
                self.say(f"appliance store: the disk of {self.data_dir} is (or was) full; "
                         "will prove a write once there is room")
            self.hurt = True
        if not should_probe(self.hurt, free, time.monotonic() - self.started):
            return False
        problem = probe_filer(self.filer_socket)
        if problem is None:
            self.say("appliance store: writes work again")
            self.hurt = False
            return False
        self.say(f"appliance store: it cannot write although the disk has room again ({problem}): restarting it")
        return True
