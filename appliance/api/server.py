"""The API daemon: HTTP/1.1 + JSON on the Unix socket HOME/run/api.sock, run by root under supervisord.

    python -m appliance.api.server --home HOME

It knows each caller from the kernel (SO_PEERCRED: uid, gid, pid; SO_PEERGROUPS: groups), never
from what the request says. The socket belongs to root and the appliance group, mode 0660 (0666
when queues.submit = "open"): who cannot reach it is refused by the kernel, and every request is
checked again here against the route's `who` (access.py). The socket is made under a temporary
name and renamed into place, and left there on exit: a client that finds it refusing (the program
restarting) retries once.

Handlers live in appliance/api/*_routes.py (routes.py). Every answer is JSON; every error is
`{"error": "one line"}` with a 4xx or 5xx status. A handler's exception becomes a 500 whose line
names the request; its traceback goes to the log (logs/api.log), not to the caller.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import traceback
import urllib.parse

from appliance.api import access
from appliance.api.protocol import MAX_BODY, PREFIX, Caller, ErrorResponse, Message, ProtocolError
from appliance.api.routes import ApiError, Request, Stream, load_routes, match
from appliance.config import Config, ConfigError, load_config
from appliance.paths import SHARED_GROUP, Home

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


def socket_path(home: Home) -> str:
    return str(home.run_dir / "api.sock")


def peer(sock: socket.socket) -> tuple[int, int, int, list[int]]:
    """(pid, uid, gid, groups) of the process at the other end, as the kernel recorded at connect."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
        groups = list(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:  # an older kernel: the groups the account has
        name = access.user_name(uid)
        groups = os.getgrouplist(name, gid) if not name.isdigit() else [gid]
    return pid, uid, gid, sorted(set(groups) | {gid})


class ConfigCache:
    """appliance.toml, read again when it changes (so `config set queues.submit` takes at once)."""

    def __init__(self, home: Home):
        self.home = home
        self._lock = threading.Lock()
        self._stamp = None
        self._config = Config()

    def get(self) -> Config:
        try:
            st = os.stat(self.home.config_file)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._config = load_config(self.home.config_file) if stamp else Config()
                except ConfigError as e:
                    print(f"api: {e}; keeping the last good settings", file=sys.stderr, flush=True)
                self._stamp = stamp
            return self._config


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "appliance-api"
    error_content_type = "application/json"

    # a Unix socket has no client address
    def address_string(self) -> str:
        caller = getattr(self, "caller", None)
        return f"{caller.name}(uid {caller.uid}, pid {caller.pid})" if caller else "-"

    def log_message(self, fmt, *args):
        print(f"api: {self.address_string()} {fmt % args}", file=sys.stderr, flush=True)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, a header too long) as JSON, one line."""
        self.close_connection = True
        self._send_json(code, {"error": (message or self.responses.get(code, ("error",))[0]).splitlines()[0]})

    def _send_json(self, status: int, obj) -> None:
        body = (json.dumps(obj) + "\n").encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_stream(self, stream: Stream) -> None:
        self.send_response(stream.status)
        self.send_header("Content-Type", stream.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in stream.headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            for chunk in stream.chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (Ctrl-C on `logs -f`)
        finally:
            close = getattr(stream.chunks, "close", None)
            if close:
                close()
        self.close_connection = True

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise ApiError(411, "send the body with a Content-Length (no chunked requests)")
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        if not length.isdigit():
            raise ApiError(400, f"Content-Length {length!r} is not a number")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"the request body is {int(length)} bytes; the limit is {MAX_BODY}")
        raw = self.rfile.read(int(length)) if int(length) else b""
        if not raw.strip():
            return None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, not {type(body).__name__}")
        return body

    def _caller(self) -> Caller:
        pid, uid, gid, groups = peer(self.connection)
        config = self.server.config.get()
        admin = access.is_admin(uid, groups, access.group_id(config.queues.admin_group))
        member_of_group = access.in_group(groups, access.group_id(SHARED_GROUP))
        return Caller(uid=uid, gid=gid, pid=pid, name=access.user_name(uid), groups=groups, admin=admin,
                      member=access.is_member(config.queues.submit, admin, member_of_group))

    def _serve(self) -> None:
        try:
            self.caller = self._caller()
            url = urllib.parse.urlsplit(self.path)
            path = url.path
            if not path.startswith(PREFIX + "/"):
                raise ApiError(404, f"no such API path: {path}; this appliance speaks {PREFIX}/ (see docs/api.md)")
            try:
                query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True, strict_parsing=bool(url.query)))
            except ValueError:
                raise ApiError(400, f"the query {url.query!r} is malformed") from None
            body = self._read_body()
            found, params = match(self.command, path)
            config = self.server.config.get()
            member_of_group = access.in_group(self.caller.groups, access.group_id(SHARED_GROUP))
            why = access.refusal(found.who, config.queues.submit, self.caller.name, self.caller.admin,
                                 member_of_group)
            if why:
                raise ApiError(403, why)
            result = found.handler(Request(caller=self.caller, method=self.command, path=path, params=params,
                                           query=query, body=body, home=self.server.home, config=config))
        except ApiError as e:
            self._send_json(e.status, ErrorResponse(e.message.splitlines()[0] if e.message else "error").to_json())
            return
        except ProtocolError as e:
            self._send_json(400, ErrorResponse(str(e).splitlines()[0]).to_json())
            return
        except Exception as e:  # noqa: BLE001 - the caller gets one line, the log the traceback
            traceback.print_exc(file=sys.stderr)
            self._send_json(500, ErrorResponse(f"{self.command} {self.path.split('?')[0]} failed inside "
                                               f"the appliance ({type(e).__name__}); an admin finds the "
                                               "details in HOME/logs/api.log").to_json())
            return
        if isinstance(result, Stream):
            self._send_stream(result)
        elif isinstance(result, Message):
            self._send_json(200, result.to_json())
        elif isinstance(result, tuple):
            status, obj = result
            self._send_json(status, obj.to_json() if isinstance(obj, Message) else obj)
        else:
            self._send_json(200, result if result is not None else {})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def do_HEAD(self):
        self._send_json(405, {"error": "HEAD is not served; use GET"})


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, home: Home, path: str):
        self.home = home
        self.config = ConfigCache(home)
        self.path = path
        super().__init__(path, Handler, bind_and_activate=False)

    def server_bind(self):
        """Bind under a temporary name, set owner and mode, then rename over the real path: a client
        never finds the socket with the wrong mode, and the path never disappears."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        self.socket.bind(tmp)
        try:
            gid = access.group_id(SHARED_GROUP)
            if os.geteuid() == 0 and gid is not None:
                os.chown(tmp, 0, gid)
            os.chmod(tmp, self.socket_mode())
            os.rename(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        self.server_address = self.path

    def socket_mode(self) -> int:
        return 0o666 if self.config.get().queues.submit == "open" else 0o660

    def service_actions(self):
        """After each request and each change of appliance.toml: the socket's mode follows
        queues.submit, so `config set queues.submit open` lets others in without a restart (and
        `group` shuts them out again)."""
        try:
            if os.stat(self.path).st_mode & 0o777 != self.socket_mode():
                os.chmod(self.path, self.socket_mode())
        except OSError:
            pass


def serve(home: Home) -> ApiServer:
    """Bind the socket and return the server (call serve_forever on it)."""
    load_routes()
    os.makedirs(home.run_dir, exist_ok=True)
    server = ApiServer(home, socket_path(home))
    server.server_bind()
    server.server_activate()
    return server


def serve_until_stopped(server: ApiServer) -> None:
    """Sleep in one select until a request, a change of appliance.toml or SIGTERM/SIGINT (through
    a wake-up fd): nothing wakes the server while nothing happens."""
    from appliance.inotify import Watch

    stopping: list = []
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    try:
        watch = Watch()
        watch.file(server.home.config_file)
    except OSError:
        watch = None  # no inotify: look at the config twice a second
    fds = [server, wake_r] + ([watch] if watch else [])
    while not stopping:
        try:
            ready = select.select(fds, [], [], 3600 if watch else 0.5)[0]
        except InterruptedError:
            ready = []
        if server in ready:
            server.handle_request()  # readable: it does not wait
        if watch in ready:
            watch.changed()
        server.service_actions()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.api.server",
                                     description="Serve the appliance's API on HOME/run/api.sock.")
    parser.add_argument("--home", required=True)
    args = parser.parse_args(argv)
    home = Home.at(args.home)
    try:
        server = serve(home)
    except OSError as e:
        print(f"api: cannot serve on {socket_path(home)}: {e.strerror or e}", file=sys.stderr, flush=True)
        return 2

    print(f"api: serving {PREFIX} on {server.path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    serve_until_stopped(server)
    server.server_close()  # closes the socket; the path stays, refusing, until the next start
    return 0


if __name__ == "__main__":
    sys.exit(main())
