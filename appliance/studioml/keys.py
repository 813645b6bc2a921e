"""Key and path rules of a request: object keys, bucket names, store endpoints, the script to run,
artifact names; and how an experiment key or a slot name becomes a file name on this box.
Every rule raises BadRequest naming the field and what is wrong."""

from __future__ import annotations

import re
from typing import Any, Optional
from urllib.parse import urlsplit

from appliance.sha256 import sha256


class BadRequest(ValueError):
    """The message can never run as written; the text names the field and what is wrong."""


def _is_aws(host: str) -> bool:
    return host == "amazonaws.com" or host.endswith(".amazonaws.com")


def check_key(key: Any, field: str) -> str:
    if not isinstance(key, str) or not key:
        raise BadRequest(f"{field}: expected a non-empty object key, got {key!r}")
    if key.startswith("/"):
        raise BadRequest(f"{field}: absolute key {key!r} is not allowed")
    if ".." in key.split("/"):
        raise BadRequest(f"{field}: key {key!r} has a '..' component")
    if "\x00" in key:
        raise BadRequest(f"{field}: key contains a NUL byte")
    try:
        if len(key.encode("utf-8")) > 1024:
            raise BadRequest(f"{field}: key is longer than S3's 1024 bytes")
    except UnicodeEncodeError:
        raise BadRequest(f"{field}: key is not valid unicode (a lone surrogate?)") from None
    return key


_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")  # what boto3 itself accepts


def check_bucket(bucket: Any, field: str) -> str:
    if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket):
        raise BadRequest(f"{field}: {bucket!r} is not a bucket name (letters, digits, '.', '-', '_')")
    return bucket


def storage_endpoint(config: dict) -> Optional[str]:
    storage = config.get("storage")
    if isinstance(storage, dict) and isinstance(storage.get("endpoint"), str):
        ep = storage["endpoint"].rstrip("/")
        return ep if "://" in ep else "http://" + ep
    return None


def endpoint_for_host(host: str, config: dict) -> str:
    """`qualified` lost the scheme: take it from config.storage.endpoint if that is the same
    host, else https for AWS and plain http for anything else (a local SeaweedFS/MinIO)."""
    storage = storage_endpoint(config)
    if storage and urlsplit(storage).netloc == host:
        return storage
    return f"https://{host}" if _is_aws(host.split(":")[0]) else f"http://{host}"


def check_endpoint(url: str, field: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BadRequest(f"{field}: {url!r} is not an endpoint URL ({e})") from None
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host or not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", host):
        raise BadRequest(f"{field}: {url!r} is not an http(s)://host[:port] endpoint")
    if port == 0:
        raise BadRequest(f"{field}: {url!r} has port 0")
    return url


MAX_KEY_CHARS = 200  # the key names a directory and a status file: well under NAME_MAX
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def check_filename(filename: str) -> str:
    """`script.py`, `sub/dir/script.py` or `-m package.module`: a path inside the workspace
    (never absolute, never through '..'), or a module name."""
    fn = filename.strip()
    if fn.startswith("-m"):
        module = fn[2:].strip()
        if not _MODULE.fullmatch(module):
            raise BadRequest(f"experiment.filename: {filename!r}: after '-m' a module name like "
                             f"'pkg.train' is expected")
        return fn
    if "\x00" in fn or fn.startswith("/") or fn.startswith("-"):
        raise BadRequest(f"experiment.filename: {filename!r} must be a path inside the workspace "
                         f"(relative, like 'train.py')")
    if ".." in fn.split("/"):
        raise BadRequest(f"experiment.filename: {filename!r} has a '..' component; name a file "
                         f"inside the workspace")
    return fn


def job_dir_name(key: str) -> str:
    """The job folder of experiment `key`: readable, and distinct for distinct keys ("a b" and
    "a_b" must never share a folder: it may hold one's finished outputs)."""
    return f"{safe_name(key)[:120]}.{sha256(key.encode()).hexdigest()[:12]}"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"

