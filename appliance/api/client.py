"""The CLI's side of the API: HTTP/1.1 + JSON over the Unix socket HOME/run/api.sock.

    from appliance.api.client import Client
    facts = Client(home).get("/v1/status")["facts"]

Every failure is an ApiClientError whose message is one line a user can act on: the appliance is
not running, the caller may not reach it, or the server's own `{"error": ...}` line. A socket that
refuses (the API program restarting under supervisord) is tried once more after a short pause.
A call's answer is read with appliance/http1.py (http.client costs a quick `appliance submit`
~10 ms to import); a followed stream, with http.client.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Iterator

from appliance import http1
from appliance.api import PREFIX, SOCKET_NAME
from appliance.paths import SHARED_GROUP, Home

RETRY_PAUSE_S = 2.0
TIMEOUT_S = 300.0
ANSWER_LIMIT = 1 << 30  # an answer is read whole; a larger one is a broken answer


class ApiClientError(Exception):
    """One line for the user; `status` is the HTTP status (0 when no answer came)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class NotRunning(ApiClientError):
    pass


class Refused(ApiClientError):
    pass


def not_running_line(home: Home) -> str:
    return (f"appliance is not running at {home.root} (no API socket): ask an admin to run "
            "'sudo appliance up'")


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def refused_line(home: Home) -> str:
    return (f"you are not in group {SHARED_GROUP} (the appliance at {home.root} refused you); ask an admin: "
            f"sudo usermod -aG {SHARED_GROUP} {_user()} (then log in again)")


def _unix_socket(path: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def _broke_off(method: str, path: str, e: BaseException) -> ApiClientError:
    return ApiClientError(f"the appliance's API broke off {method} {path}: {e or type(e).__name__}; "
                          "try again (an admin finds why in HOME/logs/api.log)")


class Client:
    def __init__(self, home: Home, timeout: float | None = TIMEOUT_S):
        """`timeout`: seconds an answer may stay silent (None: for ever, e.g. a followed log)."""
        self.home = home
        self.path = str(home.run_dir / SOCKET_NAME)
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        for attempt in (1, 2):
            try:
                return _unix_socket(self.path, self.timeout)
            except FileNotFoundError:
                raise NotRunning(not_running_line(self.home)) from None
            except PermissionError:
                if not os.path.exists(os.path.dirname(self.path)):
                    raise NotRunning(not_running_line(self.home)) from None
                raise Refused(refused_line(self.home), 403) from None
            except ConnectionRefusedError:
                if attempt == 2:
                    raise NotRunning(not_running_line(self.home)) from None
                time.sleep(RETRY_PAUSE_S)
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ENOENT):
                    raise NotRunning(not_running_line(self.home)) from None
                raise ApiClientError(f"cannot reach the appliance's API at {self.path}: {e.strerror or e}") from None
        raise NotRunning(not_running_line(self.home))

    @staticmethod
    def _request(method: str, path: str, body: dict | None) -> tuple:
        """(path with the API's prefix, body bytes or None, headers)."""
        if not path.startswith(PREFIX + "/"):
            path = PREFIX + path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        return path, data, headers

    def _send(self, method: str, path: str, body: dict | None):
        """(connection, response) of http.client, the answer not yet read (a stream)."""
        import http.client

        path, data, headers = self._request(method, path, body)
        conn = http.client.HTTPConnection("localhost", timeout=self.timeout)
        conn.sock = self._connect()
        try:
            conn.request(method, path, body=data, headers=headers)
            return conn, conn.getresponse()
        except (ConnectionError, http.client.HTTPException, socket.timeout) as e:
            conn.close()
            raise _broke_off(method, path, e) from None

    @staticmethod
    def _error(response, raw: bytes) -> ApiClientError:
        try:
            line = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            line = raw.decode(errors="replace").strip().splitlines()[0] if raw.strip() else response.reason
        cls = Refused if response.status == 403 else ApiClientError
        return cls(str(line), response.status)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON object answered; ApiClientError for any error answer."""
        target, data, headers = self._request(method, path, body)
        sock = self._connect()
        try:
            response = http1.exchange(sock, method, target, {"Host": "localhost", **headers}, body=data,
                                      limit=ANSWER_LIMIT)
        except (ConnectionError, http1.BrokenAnswer, socket.timeout) as e:
            raise _broke_off(method, target, e) from None
        finally:
            sock.close()
        raw = response.body
        if response.status >= 400:
            raise self._error(response, raw)
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise ApiClientError(f"the appliance's API answered {method} {path} with something not JSON") from None

    def get(self, path: str) -> dict:
        return self.call("GET", path)

    def post(self, path: str, body: dict | None = None) -> dict:
        return self.call("POST", path, body if body is not None else {})

    def stream(self, method: str, path: str, body: dict | None = None, on_start=None) -> Iterator[bytes]:
        """The answer's bytes as they come (a followed log); ApiClientError for an error answer.
        `on_start(headers)` is called once the answer begins."""
        conn, response = self._send(method, path, body)
        try:
            if response.status >= 400:
                raise self._error(response, response.read())
            if on_start is not None:
                on_start(response.headers)
            while True:
                chunk = response.read1(65536)
                if not chunk:
                    return
                yield chunk
        finally:
            conn.close()


def reachable(home: Home) -> bool:
    """Whether an API answers at `home` (quick: no retry)."""
    try:
        _unix_socket(str(home.run_dir / SOCKET_NAME), 2.0).close()
        return True
    except OSError:
        return False
