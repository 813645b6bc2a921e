"""The quick S3 path: HEAD, GET, PUT, DELETE and one page of LIST with the standard library:
sockets (appliance/http1.py) and CPython's own SHA-256 (appliance/sha256.py), so a process that
uses it for an http endpoint loads neither http.client nor OpenSSL (ssl is imported for https).

A runner moves a few small objects per job (a listing, a HEAD of the workspace, a small
output tar, the result record); the controller probes the store's health every few seconds
(client.check_store). boto3 costs a process ~25 MB of memory and a few ms of CPU per request;
these need neither. `Client` keeps one HTTP connection open per endpoint and
credentials and signs with AWS Signature Version 4 (path-style addressing, as the appliance's
store and StudioML use).

Only the expected answer counts: any other status, a network error, a redirect, a body larger
than asked for, an endpoint with a path, or no credentials raises `Unexpected`, and the
caller does the same with boto3, which retries, classifies the error and explains it. So the
quick path never decides that something is missing, refused or down.
"""

from __future__ import annotations

import socket
import time
from urllib.parse import quote, urlsplit

from appliance import http1
from appliance.sha256 import hmac_sha256, sha256

EMPTY_SHA256 = sha256(b"").hexdigest()
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class Unexpected(Exception):
    """Not what the quick path handles; use boto3."""


class Refused(Unexpected):
    """Nothing listens at the endpoint (the connection was refused)."""


class Closed(Unexpected):
    """The endpoint closed the connection without answering (twice: a kept one, then a new one)."""


def _sign(key: bytes, msg: str) -> bytes:
    return hmac_sha256(key, msg.encode())


def _q(value: str) -> str:
    return quote(value, safe="-_.~")


# endpoint (host:port of an http:// URL) -> a unix socket of the same server (`reach_through`)
_BESIDE: dict[str, str] = {}


def reach_through(endpoint: str, socket_path: str) -> None:
    """Requests to `endpoint` (an http:// URL) go over the unix socket `socket_path` while it
    answers, over TCP otherwise: the runner reaches the box's own store at its S3 socket, not
    through the sandbox's forwarder (a hop and ~1 ms of the forwarder's CPU per job saved)."""
    url = urlsplit(endpoint)
    if url.scheme == "http" and url.netloc:
        _BESIDE[url.netloc] = socket_path


class Client:
    """Signed requests to one endpoint with one set of credentials, over one kept-open connection."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, region: str = "us-east-1",
                 session_token: str | None = None, timeout: float = 60.0):
        url = urlsplit(endpoint or "")
        if url.scheme not in ("http", "https") or url.path.strip("/") or url.query or not url.netloc:
            raise Unexpected(f"endpoint {endpoint!r}")
        if not (access_key and secret_key):
            raise Unexpected("no credentials (unsigned requests go through boto3)")
        self.scheme, self.netloc = url.scheme, url.netloc
        self.access_key, self.secret_key = access_key, secret_key
        self.region, self.session_token, self.timeout = region or "us-east-1", session_token, timeout
        self.host, self.port = url.hostname, url.port  # ValueError (a bad port) at the first request
        self._sock: socket.socket | None = None
        self._keys: dict = {}  # day -> signing key

    # -- signing and sending

    def _signing_key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            key = _sign(_sign(_sign(_sign(f"AWS4{self.secret_key}".encode(), day), self.region), "s3"),
                        "aws4_request")
            self._keys = {day: key}
        return key

    def _headers(self, method: str, path: str, query: str, payload_sha256: str) -> dict:
        now = time.gmtime()
        amz_date, day = time.strftime("%Y%m%dT%H%M%SZ", now), time.strftime("%Y%m%d", now)
        headers = {"host": self.netloc, "x-amz-content-sha256": payload_sha256, "x-amz-date": amz_date}
        if self.session_token:
            headers["x-amz-security-token"] = self.session_token
        signed = ";".join(sorted(headers))
        canonical = "\n".join([method, path, query, *(f"{k}:{headers[k]}" for k in sorted(headers)), "",
                               signed, payload_sha256])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, sha256(canonical.encode()).hexdigest()])
        signature = hmac_sha256(self._signing_key(day), to_sign.encode()).hex()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={signature}")
        return headers

    def _connection(self) -> socket.socket:
        if self._sock is None and self.scheme == "http" and self.netloc in _BESIDE:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(_BESIDE[self.netloc])
                self._sock = sock
            except OSError:  # not there (the store restarts): over TCP, as any client
                sock.close()
        if self._sock is None:
            port = self.port or (443 if self.scheme == "https" else 80)
            sock = socket.create_connection((self.host, port), self.timeout)
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
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, method: str, bucket: str, key: str, params: dict | None = None, body: bytes | None = None,
              limit: int = 1 << 20) -> http1.Answer:
        """The answer, its body read whole: Unexpected when it is larger than `limit`. Every request
        here is idempotent, so one that meets a kept connection the server closed meanwhile is sent
        again on a new one."""
        path = "/" + _q(bucket) + ("/" + quote(key, safe="/-_.~") if key else "")
        query = "&".join(f"{_q(k)}={_q(v)}" for k, v in sorted((params or {}).items()))
        payload = sha256(body).hexdigest() if body else EMPTY_SHA256
        for attempt in (1, 2):
            headers = self._headers(method, path, query, payload)
            kept = self._sock is not None
            try:
                answer = http1.exchange(self._connection(), method, path + (f"?{query}" if query else ""), headers,
                                        body, limit=limit)
            except ConnectionRefusedError as e:
                self.close()
                raise Refused(str(e)) from None
            except (OSError, ValueError) as e:  # http1.BrokenAnswer is an OSError
                self.close()
                closed = isinstance(e, (http1.Unanswered, BrokenPipeError, ConnectionResetError))
                if closed and kept and attempt == 1:
                    continue
                raise (Closed if closed else Unexpected)(str(e)) from None
            if _ends_connection(method, answer):
                self.close()
            return answer
        raise AssertionError("unreachable")

    def _expect(self, answer: http1.Answer, status: int) -> bytes:
        if answer.status != status:
            raise Unexpected(f"{answer.status}")
        return answer.body

    # -- the four requests

    def head(self, bucket: str, key: str) -> dict:
        """The object's headers (etag, content-length, last-modified), lower-case names."""
        answer = self._send("HEAD", bucket, key)
        self._expect(answer, 200)
        return dict(answer.headers)

    def head_status(self, bucket: str, key: str) -> int:
        """The status a HEAD of the object (of the bucket, with key "") gets: 200, 403, 404..."""
        return self._send("HEAD", bucket, key).status

    def get(self, bucket: str, key: str, limit: int) -> bytes:
        """The object's bytes; Unexpected when it is larger than `limit`."""
        return self._expect(self._send("GET", bucket, key, limit=limit), 200)

    def get_if_there(self, bucket: str, key: str, limit: int) -> bytes | None:
        """As get, but None when the store answers 404 with NoSuchKey or NoSuchBucket."""
        answer = self._send("GET", bucket, key, limit=max(limit, 64 << 10))
        body = answer.body
        if answer.status == 404 and any(f"<Code>{c}</Code>".encode() in body for c in ("NoSuchKey", "NoSuchBucket")):
            return None
        if answer.status != 200 or len(body) > limit:
            raise Unexpected(f"{answer.status}")
        return body

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self._expect(self._send("PUT", bucket, key, body=body), 200)  # http1 adds its Content-Length

    def delete(self, bucket: str, key: str) -> None:
        self._expect(self._send("DELETE", bucket, key), 204)

    def list_keys(self, bucket: str, prefix: str, max_keys: int = 1000) -> set:
        """The keys under `prefix`, from one page; Unexpected when there are more."""
        import xml.etree.ElementTree as ET
        body = self._expect(self._send("GET", bucket, "", {"list-type": "2", "prefix": prefix,
                                                            "max-keys": str(max_keys)}, limit=4 << 20), 200)
        try:
            root = ET.fromstring(body)
        except ET.ParseError as e:
            raise Unexpected(f"listing: {e}") from None
        if root.tag != f"{_S3_NS}ListBucketResult" and root.tag != "ListBucketResult":
            raise Unexpected(f"listing answered {root.tag}")
        ns = _S3_NS if root.tag.startswith("{") else ""
        if (root.findtext(f"{ns}IsTruncated") or "false").strip().lower() == "true":
            raise Unexpected("listing has more than one page")
        return {c.findtext(f"{ns}Key") for c in root.iter(f"{ns}Contents")} - {None}


def _ends_connection(method: str, answer: http1.Answer) -> bool:
    """Whether the server closes the connection after `answer` (it said so, or its body ran to the close)."""
    if "close" in answer.header("connection", "").lower():
        return True
    framed = (method == "HEAD" or answer.status in (204, 304) or "content-length" in answer.headers
              or answer.header("transfer-encoding", "").lower() == "chunked")
    return not framed
