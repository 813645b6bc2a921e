"""The quick S3 path: HEAD, GET, PUT, DELETE and one page of LIST with the standard library.

A runner moves a few small objects per job (a listing, a HEAD of the workspace, a small
output tar, the result record). boto3 costs a runner ~25 MB of memory and a few ms of CPU per
request; these need neither. `Client` keeps one HTTP connection open per endpoint and
credentials and signs with AWS Signature Version 4 (path-style addressing, as the appliance's
store and StudioML use).

Only the expected answer counts: any other status, a network error, a redirect, a body larger
than asked for, an endpoint with a path, or no credentials raises `Unexpected`, and the
caller does the same with boto3, which retries, classifies the error and explains it. So the
quick path never decides that something is missing, refused or down.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import time
from urllib.parse import quote, urlsplit

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class Unexpected(Exception):
    """Not what the quick path handles; use boto3."""


def _sign(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _q(value: str) -> str:
    return quote(value, safe="-_.~")


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
        self._conn: http.client.HTTPConnection | None = None
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
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={signature}")
        return headers

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self.netloc, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send(self, method: str, bucket: str, key: str, params: dict | None = None, body: bytes = b""):
        """(status, response) with the response's body not yet read; every request here is
        idempotent, so one that meets a connection the server closed meanwhile is sent again."""
        path = "/" + _q(bucket) + ("/" + quote(key, safe="/-_.~") if key else "")
        query = "&".join(f"{_q(k)}={_q(v)}" for k, v in sorted((params or {}).items()))
        payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        for attempt in (1, 2):
            headers = self._headers(method, path, query, payload)
            if method == "PUT":
                headers["content-length"] = str(len(body))
            try:
                conn = self._connection()
                conn.request(method, path + (f"?{query}" if query else ""), body=body or None, headers=headers)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if attempt == 2:
                    raise Unexpected(str(e)) from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise Unexpected(str(e)) from None
        raise AssertionError("unreachable")

    def _read(self, response, limit: int, head: bool = False) -> bytes:
        """The whole body, at most `limit` bytes (else Unexpected, and the connection is dropped)."""
        try:
            length = response.getheader("content-length")
            if not head and length is not None and int(length) > limit:
                self.close()
                raise Unexpected(f"{length} bytes, more than the quick path takes ({limit})")
            data = response.read(limit + 1)
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.close()
            raise Unexpected(str(e)) from None
        if len(data) > limit:
            self.close()
            raise Unexpected(f"more than {limit} bytes")
        if response.will_close:
            self.close()
        return data

    def _expect(self, response, status: int, limit: int = 1 << 20, head: bool = False) -> bytes:
        body = self._read(response, limit, head)
        if response.status != status:
            raise Unexpected(f"{response.status}")
        return body

    # -- the requests

    def head(self, bucket: str, key: str) -> dict:
        """The object's headers (etag, content-length, last-modified), lower-case names."""
        response = self._send("HEAD", bucket, key)
        self._expect(response, 200, 0, head=True)
        return {k.lower(): v for k, v in response.getheaders()}

    def get(self, bucket: str, key: str, limit: int) -> bytes:
        """The object's bytes; Unexpected when it is larger than `limit`."""
        return self._expect(self._send("GET", bucket, key), 200, limit)

    def get_if_there(self, bucket: str, key: str, limit: int) -> bytes | None:
        """As get, but None when the store answers 404 with NoSuchKey or NoSuchBucket."""
        response = self._send("GET", bucket, key)
        body = self._read(response, max(limit, 64 << 10))
        if response.status == 404 and any(f"<Code>{c}</Code>".encode() in body for c in ("NoSuchKey", "NoSuchBucket")):
            return None
        if response.status != 200 or len(body) > limit:
            raise Unexpected(f"{response.status}")
        return body

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self._expect(self._send("PUT", bucket, key, body=body), 200)

    def delete(self, bucket: str, key: str) -> None:
        self._expect(self._send("DELETE", bucket, key), 204)

    def head_bucket(self, bucket: str) -> None:
        """The bucket is there and these credentials may use it."""
        self._expect(self._send("HEAD", bucket, ""), 200, 0, head=True)

    def list_keys(self, bucket: str, prefix: str, max_keys: int = 1000) -> set:
        """The keys under `prefix`, from one page; Unexpected when there are more."""
        import xml.etree.ElementTree as ET
        body = self._expect(self._send("GET", bucket, "", {"list-type": "2", "prefix": prefix,
                                                            "max-keys": str(max_keys)}), 200, 4 << 20)
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
