"""One kept-open HTTP/1.1 connection, for the quick S3 path (lite.py), with sockets only.

http.client would do, but it imports ssl (OpenSSL, ~4 MB of resident memory) and the email
package into every process that uses it, even for plain http: the long-lived runner talks to
the appliance's own store at http://127.0.0.1. Here ssl is imported only for an https endpoint.

It is strict: an answer it does not fully understand (a 1xx, a malformed status or header
line, a body shorter than announced, over-long lines) raises BadAnswer, and the caller goes
the slow way (boto3). The caller reads the whole body before the next request.
"""

from __future__ import annotations

import socket
from typing import Optional
from urllib.parse import urlsplit

_MAX_LINE = 65536
_MAX_HEADERS = 100


class BadAnswer(Exception):
    """The server's answer is not plain HTTP/1.x as this module reads it."""


class Disconnected(ConnectionResetError):
    """The server closed a kept-open connection before answering (send the request again)."""


class Response:
    """status, headers and a body read with read(); will_close: the connection ends with it."""

    def __init__(self, rfile, method: str):
        self._rfile = rfile
        line = rfile.readline(_MAX_LINE + 1)
        if not line:
            raise Disconnected("the server closed the connection without answering")
        parts = _line(line).split(None, 2)
        if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not parts[1].isdigit():
            raise BadAnswer(f"status line {line[:80]!r}")
        self.status = int(parts[1])
        if self.status < 200:
            raise BadAnswer(f"status {self.status}")
        self.headers: list[tuple[str, str]] = []
        while True:
            line = _line(rfile.readline(_MAX_LINE + 1))
            if line == "":
                break
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or len(self.headers) >= _MAX_HEADERS:
                raise BadAnswer(f"header line {line[:80]!r}")
            self.headers.append((name, value.strip()))
        connection = (self.getheader("connection") or "").lower()
        self.will_close = "close" in connection or (parts[0] == "HTTP/1.0" and "keep-alive" not in connection)
        self._chunked = False
        self._left: Optional[int] = None  # body bytes still to read; None: until the end (or chunked)
        if method == "HEAD" or self.status in (204, 304):
            self._left = 0
        elif self.getheader("transfer-encoding") is not None:
            if self.getheader("transfer-encoding").lower() != "chunked":
                raise BadAnswer(f"transfer-encoding {self.getheader('transfer-encoding')}")
            self._chunked = True
        elif self.getheader("content-length") is not None:
            length = self.getheader("content-length")
            if not length.isdigit():
                raise BadAnswer(f"content-length {length!r}")
            self._left = int(length)
        else:
            self.will_close = True  # the body ends when the connection does
        self._done = self._left == 0

    def getheader(self, name: str) -> Optional[str]:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def getheaders(self) -> list[tuple[str, str]]:
        return list(self.headers)

    def read(self, amt: int) -> bytes:
        """Up to `amt` bytes of the body; fewer only when the body ended (all of it was read)."""
        if self._done:
            return b""
        if self._chunked:
            return self._read_chunked(amt)
        if self._left is None:
            data = self._rfile.read(amt)
            self._done = len(data) < amt
            return data
        n = min(amt, self._left)
        data = self._rfile.read(n)
        if len(data) < n:
            raise BadAnswer(f"the body ended {self._left - len(data)} bytes short")
        self._left -= n
        self._done = self._left == 0
        return data

    def _read_chunked(self, amt: int) -> bytes:
        out = []
        got = 0
        while got < amt:
            if not self._left:
                size = _line(self._rfile.readline(_MAX_LINE + 1)).split(";", 1)[0].strip()
                try:
                    self._left = int(size, 16)
                except ValueError:
                    raise BadAnswer(f"chunk size {size[:40]!r}") from None
                if self._left < 0:
                    raise BadAnswer(f"chunk size {size[:40]!r}")
                if self._left == 0:
                    for _ in range(_MAX_HEADERS):  # trailers, up to the empty line
                        if _line(self._rfile.readline(_MAX_LINE + 1)) == "":
                            self._done = True
                            return b"".join(out)
                    raise BadAnswer("too many trailer lines")
            n = min(amt - got, self._left)
            data = self._rfile.read(n)
            if len(data) < n:
                raise BadAnswer("a chunk ended short")
            out.append(data)
            got += n
            self._left -= n
            if self._left == 0 and _line(self._rfile.readline(_MAX_LINE + 1)) != "":
                raise BadAnswer("no line end after a chunk")
        return b"".join(out)


def _line(raw: bytes) -> str:
    """A header-block line without its line end; BadAnswer if it is too long or cut off."""
    if len(raw) > _MAX_LINE or not raw.endswith(b"\n"):
        raise BadAnswer("a line too long, or the connection closed mid-answer")
    return raw.decode("latin-1").rstrip("\r\n")


class Connection:
    """Requests to one host over one socket, opened at the first request and kept open."""

    def __init__(self, scheme: str, netloc: str, timeout: float):
        url = urlsplit(f"{scheme}://{netloc}")
        self.scheme, self.host, self.timeout = scheme, url.hostname, timeout
        self.port = url.port or (443 if scheme == "https" else 80)  # ValueError: a bad port
        self._sock: Optional[socket.socket] = None
        self._rfile = None

    def request(self, method: str, target: str, headers: dict, body: bytes = b"") -> Response:
        lines = [f"{method} {target} HTTP/1.1", "accept-encoding: identity",
                 *(f"{k}: {v}" for k, v in headers.items())]
        if any(c in line for line in lines for c in "\r\n\0"):
            raise ValueError("a header or the target holds a line break")
        head = "\r\n".join(lines) + "\r\n\r\n"
        if self._sock is None:
            self._open()
        self._sock.sendall(head.encode("latin-1") + body)
        return Response(self._rfile, method)

    def _open(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                import ssl

                context = ssl.create_default_context()
                context.set_alpn_protocols(["http/1.1"])
                sock = context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self._sock, self._rfile = sock, sock.makefile("rb")

    def close(self) -> None:
        sock, rfile, self._sock, self._rfile = self._sock, self._rfile, None, None
        for f in (rfile, sock):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
