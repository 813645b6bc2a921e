"""The quick S3 path's own HTTP/1.1 connection (appliance/store/http11.py) and hashing
(appliance/sha256.py): what they read as an answer, and what they refuse so that boto3 takes
over. Each case is a real TCP server on 127.0.0.1 that answers with the given bytes; the whole
path against the real store is in test_runner_lean.py."""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading

import pytest

from appliance import sha256 as ours
from appliance.store import http11


def serve(*answers: bytes):
    """A server that reads one request per answer and sends that answer; returns (port, requests)."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def run():
        conn, _ = listener.accept()
        with conn:
            for answer in answers:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(rest) < length:
                    rest += conn.recv(65536)
                got.append(head + b"\r\n\r\n" + rest)
                if answer is None:
                    return  # close without answering
                conn.sendall(answer)
        listener.close()

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1], got


def ask(port: int, method: str = "GET", amt: int = 1000):
    c = http11.Connection("http", f"127.0.0.1:{port}", timeout=5)
    try:
        r = c.request(method, "/b/k", {"host": f"127.0.0.1:{port}"})
        return r.status, r.getheader("x-a"), r.read(amt), r.will_close
    finally:
        c.close()


@pytest.mark.parametrize("answer, method, expected", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello", "GET", (200, "1", b"hello", False)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\nT: 1\r\n\r\n", "GET",
     (200, None, b"hello", False)),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nConnection: close\r\n\r\nno!", "GET", (404, None, b"no!", True)),
    (b"HTTP/1.0 200 OK\r\n\r\nto the end", "GET", (200, None, b"to the end", True)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", "HEAD", (200, None, b"", False)),
    (b"HTTP/1.1 204 No Content\r\n\r\n", "DELETE", (204, None, b"", False)),
])
def test_answers_it_reads(answer, method, expected):
    port, _ = serve(answer)
    assert ask(port, method) == expected


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/2 200\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded: value\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    b"HTTP/1.1 200 OK\r\nContent-Le",
    b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 70000 + b"\r\n\r\n",
])
def test_answers_it_refuses(answer):
    port, _ = serve(answer)
    with pytest.raises(http11.BadAnswer):
        ask(port)


def test_a_kept_connection_serves_the_next_request_and_a_closed_one_says_so():
    port, got = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb", None)
    c = http11.Connection("http", f"127.0.0.1:{port}", timeout=5)
    assert c.request("GET", "/1", {"host": "h"}).read(10) == b"a"
    assert c.request("PUT", "/2", {"host": "h", "content-length": "3"}, b"xyz").read(10) == b"b"
    with pytest.raises(ConnectionResetError):  # lite sends it again on a new connection
        c.request("GET", "/3", {"host": "h"})
    c.close()
    assert got[0].startswith(b"GET /1 HTTP/1.1\r\n") and b"\r\nhost: h\r\n" in got[0]
    assert got[1].endswith(b"\r\ncontent-length: 3\r\n\r\nxyz")


def test_no_line_break_reaches_the_wire():
    c = http11.Connection("http", "127.0.0.1:9", timeout=5)
    for headers, target in (({"x-amz-security-token": "a\r\nx-evil: 1"}, "/k"), ({"host": "h"}, "/k HTTP/1.1\r\nx: 1")):
        with pytest.raises(ValueError):
            c.request("GET", target, headers)


def test_refused_is_a_connection_refused_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        ask(port)


@pytest.mark.parametrize("key, msg", [
    (b"\x0b" * 20, b"Hi There"),  # RFC 4231 test case 1
    (b"Jefe", b"what do ya want for nothing?"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First"),
    (b"", b""),
    (b"k" * 64, b"m" * 100000),
])
def test_our_sha256_and_hmac_are_hashlibs(key, msg):
    assert ours.hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()
    assert ours.sha256(msg).hexdigest() == hashlib.sha256(msg).hexdigest()
    h = ours.sha256()
    h.update(key)
    h.update(msg)
    assert h.hexdigest() == hashlib.sha256(key + msg).hexdigest()
    big = msg * (ours.LARGE // max(len(msg), 1) + 1)
    assert ours.sha256(big).hexdigest() == hashlib.sha256(big).hexdigest()
