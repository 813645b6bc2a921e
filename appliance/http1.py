"""One HTTP/1.1 request and its whole answer over a socket the caller opened: the CLI's quick path.

`appliance submit` makes two or three small requests (the store's HEAD and PUT, the API's
calls on its Unix socket) and is timed from the user's shell: http.client alone costs it ~10 ms
to import (it brings email's header parser and ssl). This speaks the plain part of HTTP/1.1
those peers answer with: a status line, headers, then a body of Content-Length bytes, a chunked
body, or one that ends when the peer closes. Anything else (a malformed status line or header,
a body larger than `limit`, a peer that closes too early) is `BrokenAnswer`, an OSError, so a
caller that handles network errors handles it too. No connection is kept; TLS is not here
(callers use http.client for https).
"""

from __future__ import annotations

MAX_HEADERS = 100
MAX_LINE = 65536
BLOCK = 1 << 20


class BrokenAnswer(OSError):
    """The peer's answer is not one this module reads (or it stopped half way)."""


class Answer:
    """`status`, `reason`, `headers` (lower-case names) and the whole `body`."""

    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: str, headers: dict, body: bytes):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body

    def header(self, name: str, default=None):
        return self.headers.get(name.lower(), default)


def exchange(sock, method: str, target: str, headers: dict, body=None, length: int | None = None,
             limit: int = 64 << 20) -> Answer:
    """Send `method target` with `headers` and `body` (bytes, or a binary file of `length`
    bytes) on the connected `sock`; the answer, its body read whole (at most `limit` bytes).
    A Content-Length header is added for a body; `headers` name the rest (Host included)."""
    lines = [f"{method} {target} HTTP/1.1"]
    if body is not None:
        size = len(body) if isinstance(body, (bytes, bytearray)) else length
        if size is None:
            raise ValueError("a file body needs its length")
        headers = {**headers, "Content-Length": str(size)}
    for name, value in headers.items():
        if "\r" in f"{name}{value}" or "\n" in f"{name}{value}":
            raise ValueError(f"header {name!r}: a line break in it")
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if body is None or isinstance(body, (bytes, bytearray)):
        sock.sendall(head + bytes(body or b""))
    else:
        sock.sendall(head)
        left = length
        while left > 0:
            block = body.read(min(BLOCK, left))
            if not block:
                raise ValueError("the file is shorter than its length")
            sock.sendall(block)
            left -= len(block)
    with sock.makefile("rb") as fp:
        while True:
            status, reason = _status_line(fp)
            found = _headers(fp)
            if not 100 <= status < 200:
                break  # a 100 Continue (unasked) comes before the real answer
        if method == "HEAD" or status in (204, 304):
            return Answer(status, reason, found, b"")
        coding = found.get("transfer-encoding", "identity").lower()
        if coding == "chunked":
            data = _chunked(fp, limit)
        elif coding != "identity":
            raise BrokenAnswer(f"transfer-encoding {coding!r}")
        elif "content-length" in found:
            text = found["content-length"]
            if not (text.isascii() and text.isdigit()):
                raise BrokenAnswer(f"content-length {text[:20]!r}")
            size = int(text)
            if size > limit:
                raise BrokenAnswer(f"a body of {size} bytes (at most {limit} expected)")
            data = _exactly(fp, size)
        else:
            data = fp.read(limit + 1)  # to the close
            if len(data) > limit:
                raise BrokenAnswer(f"a body over {limit} bytes")
    return Answer(status, reason, found, data)


def _line(fp) -> bytes:
    line = fp.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise BrokenAnswer("a line too long")
    if not line:
        raise BrokenAnswer("the peer closed the connection without an answer")
    return line


def _status_line(fp) -> tuple[int, str]:
    parts = _line(fp).decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (len(parts[1]) == 3 and parts[1].isdigit()):
        raise BrokenAnswer(f"not an HTTP/1.x status line: {' '.join(parts)[:80]!r}")
    return int(parts[1]), parts[2] if len(parts) > 2 else ""


def _headers(fp) -> dict:
    found: dict = {}
    for _ in range(MAX_HEADERS + 1):
        line = _line(fp).decode("latin-1").rstrip("\r\n")
        if not line:
            return found
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise BrokenAnswer(f"a header line not read here: {line[:80]!r}")
        name, value = name.lower(), value.strip()
        found[name] = f"{found[name]}, {value}" if name in found else value
    raise BrokenAnswer(f"more than {MAX_HEADERS} headers")


def _exactly(fp, size: int) -> bytes:
    data = fp.read(size)
    if len(data) != size:
        raise BrokenAnswer(f"the peer closed after {len(data)} of {size} bytes")
    return data


def _chunked(fp, limit: int) -> bytes:
    parts, total = [], 0
    while True:
        text = _line(fp).split(b";", 1)[0].strip()
        if not text or text.strip(b"0123456789abcdefABCDEF"):
            raise BrokenAnswer(f"a chunk size {text[:20]!r}")
        size = int(text, 16)
        if size == 0:
            while _line(fp) not in (b"\r\n", b"\n"):  # trailers
                pass
            return b"".join(parts)
        total += size
        if total > limit:
            raise BrokenAnswer(f"a body over {limit} bytes")
        parts.append(_exactly(fp, size))
        if _line(fp) not in (b"\r\n", b"\n"):
            raise BrokenAnswer("a chunk without its line end")
