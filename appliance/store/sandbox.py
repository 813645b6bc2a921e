"""Run the bundled store so that only its S3 API can be reached, and only with signatures.

SeaweedFS's master, volume and filer take unauthenticated requests on their HTTP and gRPC
ports, and its own security config cannot close them all: a JWT key leaves the master handing
out write tokens (`/dir/assign`) and deleting whole buckets (`/col/delete`) to anyone, and its
IP whitelist, the only guard of those, also refuses the store's own internal traffic from
127.0.0.1. So the store runs in a private network namespace (only its own loopback), and
S3 reaches the host through its unix socket (`-s3.localSocket`), forwarded here from
HOST:PORT with `splice` (no copy through Python).

    python -m appliance.store.sandbox --listen 127.0.0.1:8333 --socket DIR/s3.sock \
        --private DIR ... -- weed server -filer -s3 ...

This process stays the one supervisord watches: it forwards TERM/INT to the store and exits
with its status, and HUP (read the identities again) without stopping it; the store gets
SIGKILL if this process dies. It restarts the store when the store cannot write after its disk
was full (appliance/store/watchdog.py).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

from appliance.store.watchdog import CHECK_EVERY_S, Watchdog

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
F_SETPIPE_SZ = 1031
CHUNK = 1 << 20
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls it


class SandboxError(RuntimeError):
    pass


def make_private(path: str) -> None:
    """`path` 0700 and everything under it go-rwx: the store's files are its owner's alone."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    for root, dirs, files in os.walk(path):
        for name in [root] + [os.path.join(root, f) for f in dirs + files]:
            try:
                st = os.lstat(name)
                if st.st_mode & 0o077 and not os.path.islink(name):
                    os.chmod(name, st.st_mode & ~0o077)
            except FileNotFoundError:
                pass


def secret_environment(pairs: list[str]) -> dict[str, str]:
    """NAME=PATH pairs: NAME set to PATH's content, which is made (32 random bytes in hex, 0600)
    the first time. The store's secrets stay in its data folder, never in supervisord's config."""
    env = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        try:
            with open(path) as fh:
                value = fh.read().strip()
        except FileNotFoundError:
            value = ""
        if not value:  # made whole or not at all: a torn key would lock the store out
            value = os.urandom(32).hex()
            fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, value.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(path + ".new", path)
        env[name] = value
    return env


def enter_private_network() -> None:
    """Move this process into a new network namespace with only `lo`, up.

    As root that is `unshare(CLONE_NEWNET)`; as another user it takes a user namespace too,
    mapping the user to itself (files the store writes keep their owner)."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNET if uid == 0 else CLONE_NEWNET | CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise SandboxError(
            f"cannot give the object store a private network ({os.strerror(err)}): run the appliance as "
            "root, or allow user namespaces (sysctl kernel.unprivileged_userns_clone=1, or on Ubuntu "
            "kernel.apparmor_restrict_unprivileged_userns=0), or use an external store "
            "(`appliance config set object_store.kind external`)")
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        got = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
        flags = struct.unpack("16sH22x", got)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Move bytes src -> dst until src ends, then end dst's writing side.

    Two threads around a pipe: one splices src into it while the other splices it into dst,
    so neither side waits for the other (one thread alternating halves GET throughput). The
    sockets are non-blocking: a splice from a socket into a pipe holds the pipe's lock while
    it waits for data, which would stall the other thread."""
    if not hasattr(os, "splice"):  # Python < 3.10
        return _copy(src, dst)
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
    except OSError:
        pass  # the default 64 KiB pipe works too, just with more calls
    drain = threading.Thread(target=_drain, args=(r, dst), daemon=True)
    drain.start()
    try:
        while _splice(src.fileno(), w, src.fileno(), select.POLLIN):
            pass
    except OSError:
        pass  # src went away: dst sees its connection end
    finally:
        os.close(w)  # the drain sees the end of the pipe
        drain.join()


def _drain(r: int, dst: socket.socket) -> None:
    try:
        while _splice(r, dst.fileno(), dst.fileno(), select.POLLOUT):
            pass
    except OSError:
        # dst went away; keep emptying the pipe so the filling side does not block on it
        while os.read(r, CHUNK):
            pass
    finally:
        os.close(r)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _splice(src: int, dst: int, sock: int, event: int) -> int:
    """One splice, waiting on the non-blocking socket `sock` for `event` while it would block."""
    while True:
        try:
            return os.splice(src, dst, CHUNK)
        except BlockingIOError:
            poll = select.poll()
            poll.register(sock, event)
            poll.poll()


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _serve_connection(client: socket.socket, path: str) -> None:
    with client:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with upstream:
            try:
                upstream.connect(path)
            except OSError:
                return  # the store is not up (yet): the client sees the connection close
            if hasattr(os, "splice"):
                client.setblocking(False)
                upstream.setblocking(False)
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join()


def forward(listener: socket.socket, path: str) -> None:
    """Accept on `listener` forever; each connection is piped to the unix socket `path`."""
    while True:
        try:
            client, _ = listener.accept()
        except OSError as e:  # e.g. out of file descriptors: keep serving once some are free
            print(f"appliance store: accepting a connection: {e}", file=sys.stderr, flush=True)
            time.sleep(0.5)
            continue
        threading.Thread(target=_serve_connection, args=(client, path), daemon=True).start()


def listen(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, int(port)), family=family, backlog=128)
    except OSError as e:
        raise SandboxError(f"cannot listen on {address} for the object store: {e}; stop what uses the "
                           "port (`ss -ltnp`) or choose another with `appliance config set object_store.port "
                           "PORT`") from None


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Store:
    """The store's process: started, restarted when the watchdog says so, stopped with its wrapper.

    It never outlives this process: it gets SIGKILL if this process dies (PR_SET_PDEATHSIG), and
    a stop that it does not obey within KILL_AFTER_S ends with SIGKILL (a store whose disk was
    full may hang in its shutdown; its data survives a kill)."""

    KILL_AFTER_S = 5.0

    def __init__(self, command: list[str], s3_socket: str):
        self.command, self.s3_socket = command, s3_socket
        self.pid = 0
        self.stopping = False
        self.restarting = False
        self.lock = threading.Lock()

    def start(self) -> None:
        try:
            os.unlink(self.s3_socket)  # a stale socket from a killed store
        except FileNotFoundError:
            pass
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)
            try:
                os.execvp(self.command[0], self.command)
            except OSError as e:
                print(f"appliance store: cannot run {self.command[0]}: {e}", file=sys.stderr, flush=True)
            os._exit(127)
        self.pid = pid

    def _end(self, pid: int, signum: int) -> None:
        """Send `signum` to `pid`, then SIGKILL if it is still there KILL_AFTER_S later."""
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        timer = threading.Timer(self.KILL_AFTER_S, self._kill_if, args=(pid,))
        timer.daemon = True
        timer.start()

    def _kill_if(self, pid: int) -> None:
        with self.lock:
            if self.pid == pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def reload(self) -> None:
        """Pass SIGHUP on: the store reads its identities again and goes on running."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    def stop(self, signum: int) -> None:
        self.stopping = True
        if self.pid:
            self._end(self.pid, signum)

    def restart(self) -> None:
        with self.lock:
            if self.stopping or not self.pid:
                return
            self.restarting = True
            pid = self.pid
        self._end(pid, signal.SIGTERM)

    def watch(self, watchdog) -> None:
        while not self.stopping:
            time.sleep(CHECK_EVERY_S)
            try:
                if watchdog.tick():
                    self.restart()
                    watchdog.restarted()
            except Exception as e:  # noqa: BLE001 - the watchdog must not end; the store keeps running
                _say(f"appliance store: the watchdog failed: {e!r}")

    def run(self) -> int:
        """Start the store and wait; restart it when asked; its exit status once stopped."""
        self.start()
        while True:
            try:
                _, status = os.waitpid(self.pid, 0)
            except InterruptedError:
                continue
            with self.lock:
                again = self.restarting and not self.stopping
                self.restarting = False
                self.pid = 0
                if again:
                    self.start()
            if again and self.stopping:  # a stop that came while it was down
                self._end(self.pid, signal.SIGTERM)
            if not again:
                return os.waitstatus_to_exitcode(status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m appliance.store.sandbox")
    p.add_argument("--listen", required=True, help="HOST:PORT where clients reach S3")
    p.add_argument("--socket", required=True, help="the store's S3 unix socket")
    p.add_argument("--private", action="append", default=[], help="folder made 0700, contents go-rwx")
    p.add_argument("--data", help="the store's data folder: watched for a full disk (appliance/store/watchdog.py)")
    p.add_argument("--filer-socket", help="the filer's unix socket, where the watchdog proves a write")
    p.add_argument("--secret-env", action="append", default=[], metavar="NAME=PATH",
                   help="give the store NAME from the file PATH (made with a random key the first time)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the store's command after --")
    os.umask(0o077)
    try:
        for path in args.private:
            make_private(path)
        os.environ.update(secret_environment(args.secret_env))
        listener = listen(args.listen)  # in the host's network, before leaving it
        enter_private_network()
    except (SandboxError, OSError) as e:
        print(f"appliance store: {e}", file=sys.stderr, flush=True)
        return 1
    store = Store(command, args.socket)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: store.stop(signum))
    # a reload, not a stop (as a stop it armed the kill timer: the store died 5 s after each
    # new member identity)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: store.reload())
    threading.Thread(target=forward, args=(listener, args.socket), daemon=True).start()
    if args.data and args.filer_socket:
        threading.Thread(target=store.watch, args=(Watchdog(args.data, args.filer_socket, say=_say),),
                         daemon=True).start()
    return store.run()

if __name__ == "__main__":
    sys.exit(main())
