"""HEAD and PUT of one S3 object with the standard library (AWS Signature Version 4).

`appliance submit` sends one small workspace per call; importing boto3 and building a client
costs ~0.2 s of CPU, most of a submit. These two requests need neither, and on a plain http
endpoint (the bundled store's) not even http.client: appliance/http1.py sends them. Anything
unusual (an endpoint with a path, an answer other than the expected ones, a network error)
raises `Unexpected`, and the caller does the same with boto3, which retries and explains.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

from appliance import http1

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class Unexpected(Exception):
    """Not what the quick path handles; use boto3."""


def _sign(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _request(endpoint: str, access_key: str, secret_key: str, region: str, method: str,
             bucket: str, key: str, payload_sha256: str, body=None, length: int = 0,
             timeout: float = 10.0) -> int:
    """Send one signed request (path-style addressing); returns the HTTP status."""
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or url.path.strip("/") or url.query or not url.hostname:
        raise Unexpected(f"endpoint {endpoint}")
    path = quote(f"/{bucket}/{key}", safe="/-_.~")
    now = time.gmtime()
    amz_date, day = time.strftime("%Y%m%dT%H%M%SZ", now), time.strftime("%Y%m%d", now)
    headers = {"host": url.netloc, "x-amz-content-sha256": payload_sha256, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, path, "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "",
                           signed, payload_sha256])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    signing_key = _sign(_sign(_sign(_sign(f"AWS4{secret_key}".encode(), day), region), "s3"),
                        "aws4_request")
    signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    if url.scheme == "https":
        return _request_tls(url.netloc, method, path, headers, body, length, timeout)
    try:
        port = url.port or 80
        # a bytes host: getaddrinfo then needs no idna codec (nor its import)
        sock = socket.create_connection((url.hostname.encode(), port), timeout=timeout)
    except (OSError, ValueError) as e:
        raise Unexpected(str(e)) from None
    try:
        answer = http1.exchange(sock, method, path, headers, body=body if method == "PUT" else None,
                                length=length, limit=1 << 20)
        return answer.status
    except OSError as e:  # BrokenAnswer included
        raise Unexpected(str(e)) from None
    finally:
        sock.close()


def _request_tls(netloc: str, method: str, path: str, headers: dict, body, length: int, timeout: float) -> int:
    import http.client

    if method == "PUT":
        headers["content-length"] = str(length)
    conn = http.client.HTTPSConnection(netloc, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as e:
        raise Unexpected(str(e)) from None
    finally:
        conn.close()


def exists(endpoint: str, access_key: str, secret_key: str, region: str, bucket: str,
           key: str) -> bool:
    status = _request(endpoint, access_key, secret_key, region, "HEAD", bucket, key, EMPTY_SHA256)
    if status == 200:
        return True
    if status == 404:
        return False
    raise Unexpected(f"HEAD answered {status}")


def put_bytes(endpoint: str, access_key: str, secret_key: str, region: str, bucket: str, key: str,
              data: bytes, sha256: str) -> None:
    """PUT `data`, whose sha256 (hex) the caller knows already."""
    status = _request(endpoint, access_key, secret_key, region, "PUT", bucket, key, sha256,
                      body=data, length=len(data))
    if status != 200:
        raise Unexpected(f"PUT answered {status}")


def put_file(endpoint: str, access_key: str, secret_key: str, region: str, bucket: str, key: str,
             path: Path, sha256: str) -> None:
    """PUT the file at `path`, whose sha256 (hex) the caller knows already."""
    with open(path, "rb") as fh:
        status = _request(endpoint, access_key, secret_key, region, "PUT", bucket, key, sha256,
                          body=fh, length=Path(path).stat().st_size)
    if status != 200:
        raise Unexpected(f"PUT answered {status}")
