"""appliance/http1.py: one request and its whole answer, as the CLI's quick paths (the store's HEAD
and PUT, the API's calls) read them; what it does not read is BrokenAnswer, never a wrong body."""

from __future__ import annotations

import io
import socket
import threading

import pytest

from appliance import http1


def _served(answer: bytes, method="GET", body=None, length=None, limit=1 << 20):
    """Send a request on one end of a socket pair whose other end answers `answer` (then closes);
    (what the peer received, the Answer)."""
    ours, theirs = socket.socketpair()
    got = bytearray()

    def peer():
        with theirs:
            theirs.settimeout(5)
            while b"\r\n\r\n" not in got:
                got.extend(theirs.recv(65536))
            head, _, rest = bytes(got).partition(b"\r\n\r\n")
            want = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                         if line.lower().startswith(b"content-length:")), 0)
            while len(got) - len(head) - 4 < want:
                got.extend(theirs.recv(65536))
            theirs.sendall(answer)

    t = threading.Thread(target=peer)
    t.start()
    try:
        with ours:
            ours.settimeout(5)
            return got, http1.exchange(ours, method, "/b/k", {"Host": "x"}, body=body, length=length, limit=limit)
    finally:
        t.join()


def test_a_body_of_content_length_bytes_and_the_headers_by_lower_case_name():
    sent, answer = _served(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello")
    assert (answer.status, answer.reason, answer.body) == (200, "OK", b"hello")
    assert answer.header("x-a") == "1, 2" and answer.header("Content-Length") == "5"
    assert sent.startswith(b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\n")


def test_a_put_sends_its_file_with_its_length():
    sent, answer = _served(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "PUT",
                           body=io.BytesIO(b"x" * 3000), length=3000)
    assert answer.status == 200 and answer.body == b""
    assert b"Content-Length: 3000\r\n" in sent and sent.endswith(b"\r\n\r\n" + b"x" * 3000)


def test_a_head_answer_has_no_body_whatever_its_length_says():
    _, answer = _served(b"HTTP/1.1 404 Not Found\r\nContent-Length: 120\r\n\r\n", "HEAD")
    assert (answer.status, answer.body) == (404, b"")


def test_a_chunked_body_a_100_continue_and_a_body_that_ends_at_the_close():
    _, answer = _served(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nTrailer: t\r\n\r\n")
    assert (answer.status, answer.body) == (201, b"abcde")
    _, answer = _served(b"HTTP/1.0 200 OK\r\n\r\nall of it")
    assert answer.body == b"all of it"


@pytest.mark.parametrize("answer", [
    b"",                                                          # closed without an answer
    b"SSH-2.0-OpenSSH\r\n\r\n",                                   # not HTTP
    b"HTTP/1.1 2000 OK\r\n\r\n",                                  # not a status
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",        # closed half way
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",             # no length
    b"HTTP/1.1 200 OK\r\nContent-Length: 2048\r\n\r\n" + b"x" * 2048,  # over the limit
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx",      # a coding not read here
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a bad chunk size
    b"HTTP/1.1 200 OK\r\nBad header\r\n\r\n",                     # a header without a colon
    b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",                     # an obsolete folded line
])
def test_what_it_does_not_read_is_a_broken_answer(answer):
    with pytest.raises(http1.BrokenAnswer):
        _served(answer, limit=1024)
