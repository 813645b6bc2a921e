"""Moving an experiment's artifacts between the S3 store and its job directory.

One piece, over 400 lines, on purpose: every byte a job sends to or takes from the store
(listing, download, cache key, upload, result records) goes through the one retry policy and
the one fallback from the small client (store/lite.py) to boto3 here.

The layout (what goes where) is artifacts.py's.

Every artifact is a tar of a directory. We write what the `studioml` client writes: a plain
(uncompressed) tar whose members are the directory's entries by relative name; we read any tar
(`r:*`: the client may compress). Downloads go through the safe extractor with a byte bound.

- Each artifact carries its own endpoint and credentials (the request's `qualified` and
  `credentials.aws`). No credentials means unsigned requests, never the runner's own (boto3
  would otherwise fall back to the appliance's environment).
- Immutable artifacts (`workspace`) are cached by key (cache.py): a repeated experiment does
  not download them again.
- Mutable ones are downloaded if they exist (a job that runs again, after its runner was
  killed, continues from its last upload: `modeldir` checkpoints, `output` so far) and
  uploaded by `Uploader` (uploader.py), which skips a directory unchanged since its last upload.

Errors: a store that does not answer is retried with backoff, then `StoreUnavailable` (the
runner puts the message back). Refused credentials are `AccessDenied` and a missing immutable
object `ArtifactMissing`: retrying cannot help, the message text names artifact, endpoint,
bucket and key.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from appliance.studioml.artifacts import where
from appliance.studioml.packing import PackedStream, unpack

class ArtifactError(Exception):
    """An artifact could not be moved; permanent for this request."""


class AccessDenied(ArtifactError):
    pass


class ArtifactTooBig(ArtifactError):
    """An artifact holds more than the job may still write to its disk."""


class ArtifactMissing(ArtifactError):
    pass


class StoreUnavailable(ArtifactError):
    """The store did not answer (after retries): try again later."""


@dataclass
class RetryPolicy:
    attempts: int = 5
    first_delay_s: float = 1.0
    max_delay_s: float = 15.0
    sleep: Callable[[float], None] = time.sleep


_clients: dict = {}
_quick_clients: dict = {}
_SLOW = object()  # the quick path could not answer: boto3 does


def _quickly(art, op: Callable):
    """op(client) on the standard-library path (appliance/store/lite.py: no boto3 in the runner
    for a job's few small requests); _SLOW when that path cannot answer, and the caller then
    does the same with boto3, which retries, classifies and explains."""
    from appliance.store import lite
    # one connection per thread: the runner asks a job's HEAD and LIST from a second thread
    ident = (art.endpoint_url, art.access_key, art.secret_key, art.region, art.session_token,
             threading.get_ident())
    c = _quick_clients.get(ident, False)
    if c is False:
        try:
            c = lite.Client(art.endpoint_url, art.access_key, art.secret_key, art.region or "us-east-1",
                            art.session_token, timeout=60)
        except lite.Unexpected:
            c = None  # unsigned or an odd endpoint: boto3 always
        _quick_clients[ident] = c
    if c is None:
        return _SLOW
    try:
        return op(c)
    except lite.Unexpected:
        return _SLOW


def client_for(art):
    """A (cached) S3 client for the artifact's endpoint and its own credentials."""
    ident = (art.endpoint_url, art.access_key, art.secret_key, art.region, art.session_token)
    c = _clients.get(ident)
    if c is None:
        if art.access_key and art.secret_key:
            from appliance.store.client import s3_client
            c = s3_client(art.endpoint_url, art.access_key, art.secret_key,
                          art.region or "us-east-1", art.session_token,
                          connect_timeout=5, read_timeout=60, attempts=2)
        else:
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config as BotoConfig
            c = boto3.client("s3", endpoint_url=art.endpoint_url,
                             region_name=art.region or "us-east-1",
                             config=BotoConfig(signature_version=UNSIGNED,
                                               s3={"addressing_style": "path"},
                                               connect_timeout=5, read_timeout=60,
                                               retries={"max_attempts": 2, "mode": "standard"}))
        _clients[ident] = c
    return c


_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed", "AllAccessDisabled"}
_MISSING = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def _classify(e: Exception, art, doing: str) -> ArtifactError:
    ClientError, BotoCoreError, NoCredentialsError, ParamValidationError = _botocore_errors()
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in _DENIED or status == 403:
            return AccessDenied(f"{doing} {where(art)}: the store refused the request's "
                                f"credentials ({code or status}); check credentials.aws of this "
                                f"artifact (access key {art.access_key or 'none'})")
        if code in _MISSING or status == 404:
            return ArtifactMissing(f"{doing} {where(art)}: {code or 'not found'}")
        if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError",
                                     "RequestTimeout"):
            return StoreUnavailable(f"{doing} {where(art)}: the store answered {code or status}")
        return ArtifactError(f"{doing} {where(art)}: {code or status}: {err.get('Message', e)}")
    if isinstance(e, NoCredentialsError):
        return AccessDenied(f"{doing} {where(art)}: no credentials")
    if isinstance(e, ParamValidationError):
        return ArtifactError(f"{doing} {where(art)}: the request is invalid: {e}")
    if _unknown_host(e):
        return ArtifactError(f"{doing} {where(art)}: the request names a host that does not exist: {e}")
    if isinstance(e, (BotoCoreError, ConnectionError, TimeoutError)):
        return StoreUnavailable(f"{doing} {where(art)}: cannot reach the store: {e}")
    return ArtifactError(f"{doing} {where(art)}: {e}")


def _unknown_host(e: Exception) -> bool:
    """A name that does not resolve (EAI_NONAME) is the request's mistake, not an outage; a
    refused or timed-out connection, or a resolver that is down (EAI_AGAIN), may pass."""
    import socket
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, socket.gaierror) and e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
            return True
        text = str(e)
        if "Name or service not known" in text or "No address associated with hostname" in text:
            return True
        e = e.__cause__ or e.__context__ or getattr(e, "kwargs", {}).get("error")
    return False


class _NeverRaised(Exception):
    pass


def _botocore_errors() -> tuple:
    """botocore's ClientError, BotoCoreError, NoCredentialsError and ParamValidationError once
    botocore is loaded (before, none can have been raised): a runner loads it only when a job
    talks to the store, never while idle."""
    loaded = sys.modules.get("botocore.exceptions")
    if loaded is None:
        return (_NeverRaised,) * 4
    return loaded.ClientError, loaded.BotoCoreError, loaded.NoCredentialsError, loaded.ParamValidationError


def _boto3_error() -> type:
    """boto3's base error, once boto3 is loaded (before, none can have been raised). An idle
    runner never loads boto3: importing it costs ~20 MB of RSS (bench/compare.py)."""
    loaded = sys.modules.get("boto3.exceptions")
    return loaded.Boto3Error if loaded else _NeverRaised


def _unwrap(e: Exception) -> Exception:
    """boto3's transfer layer wraps the client error (S3UploadFailedError, ...)."""
    if isinstance(e, _boto3_error()):
        inner = e.__cause__ or e.__context__
        if isinstance(inner, _botocore_errors()[:2]):
            return inner
    return e


# failed store requests of this process, by kind, for /metrics (runner/counters.py)
STORE_ERRORS = {"unavailable": 0, "access_denied": 0, "other": 0}


def _count_error(err: ArtifactError) -> None:
    if isinstance(err, ArtifactMissing):
        return  # an answer, not an error (mutable artifacts often do not exist yet)
    kind = ("unavailable" if isinstance(err, StoreUnavailable) else
            "access_denied" if isinstance(err, AccessDenied) else "other")
    STORE_ERRORS[kind] += 1


def with_retries(fn: Callable[[], object], art, doing: str, retry: RetryPolicy):
    """Call fn; transient store failures are retried with exponential backoff."""
    delay = retry.first_delay_s
    for attempt in range(1, retry.attempts + 1):
        try:
            return fn()
        except (*_botocore_errors()[:2], ConnectionError, TimeoutError, _boto3_error()) as e:
            err = _classify(_unwrap(e), art, doing)
            _count_error(err)
            if not isinstance(err, StoreUnavailable):
                raise err from None
            if attempt == retry.attempts:
                raise StoreUnavailable(f"{err} (gave up after {attempt} attempts)") from None
        retry.sleep(delay)
        delay = min(delay * 2, retry.max_delay_s)


PART_BYTES = 8 << 20  # multipart part size (and the size from which a transfer goes multipart)
PARALLEL_PARTS = 8  # parts in flight at once (threads of the transfer manager)
UPLOAD_PARTS_IN_MEMORY = 3  # parts read from the tar stream, waiting or being sent


def _transfer_config():
    """Big objects go multipart, several parts at once (the transfer manager's threads, alive
    only during the transfer call). Memory stays bounded: an upload from the tar stream (not
    seekable) holds at most UPLOAD_PARTS_IN_MEMORY parts, a download at most 16 MiB of chunks
    waiting for the disk."""
    from boto3.s3.transfer import TransferConfig
    config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                            max_concurrency=PARALLEL_PARTS, use_threads=True)
    config.max_in_memory_upload_chunks = UPLOAD_PARTS_IN_MEMORY
    config.max_in_memory_download_chunks = 64  # of io_chunksize (256 KiB)
    return config


def download(art, dest: Path, retry: RetryPolicy) -> None:
    """The object of `art` into the file `dest`."""
    got = _quickly(art, lambda q: q.get(art.bucket, art.key, PART_BYTES))
    if got is not _SLOW:
        with open(dest, "wb") as out:
            out.write(got)
        return
    c = client_for(art)
    with_retries(lambda: c.download_file(art.bucket, art.key, str(dest),
                                         Config=_transfer_config()),
                 art, "downloading", retry)


def exists(art, retry: RetryPolicy) -> bool:
    if _quickly(art, lambda q: q.head(art.bucket, art.key)) is not _SLOW:
        return True
    c = client_for(art)
    try:
        with_retries(lambda: c.head_object(Bucket=art.bucket, Key=art.key), art,
                     "looking up", retry)
        return True
    except ArtifactMissing:
        return False


class _TooMany(Exception):
    pass


def _list_keys(art, prefix: str, max_pages: int = 5) -> set:
    quick = _quickly(art, lambda q: q.list_keys(art.bucket, prefix))
    if quick is not _SLOW:
        return quick
    found = set()
    pages = client_for(art).get_paginator("list_objects_v2").paginate(
        Bucket=art.bucket, Prefix=prefix)
    for n, page in enumerate(pages):
        if n == max_pages:
            raise _TooMany(prefix)  # a big shared folder: cheaper to ask for each
        found.update(o["Key"] for o in page.get("Contents", ()))
    return found


def listed(arts: list, retry: RetryPolicy) -> dict[str, bool]:
    """Whether each of `arts` exists, by name, from one listing per endpoint, credentials,
    bucket and key folder (a job's mutable artifacts share `experiments/<key>/`): one request
    instead of one per artifact. An artifact left out of the answer could not be listed (no
    common folder, or the credentials may read but not list): ask the store for it alone.
    A store that does not answer raises StoreUnavailable, as a download would."""
    groups: dict = {}
    for art in arts:
        ident = (art.endpoint_url, art.access_key, art.secret_key, art.region,
                 art.session_token, art.bucket)
        groups.setdefault(ident, []).append(art)
    out: dict[str, bool] = {}
    for group in groups.values():
        prefix = os.path.commonprefix([a.key for a in group])
        prefix = prefix[:prefix.rfind("/") + 1]
        if not prefix:
            continue
        try:
            found = with_retries(functools.partial(_list_keys, group[0], prefix), group[0],
                                 "listing", retry)
        except StoreUnavailable:
            raise
        except Exception:  # e.g. no permission to list: each is fetched on its own
            continue
        out.update((a.name, a.key in found) for a in group)
    return out


def place(art, obj: Path | object, dest: Path, max_bytes: int) -> int:
    """Put a downloaded object into `dest/`: unpacked, or as a file when `unpack` is false; at
    most `max_bytes` of it (ArtifactTooBig past that). Returns the bytes written."""
    if art.unpack:
        from appliance.studioml.safetar import TooBig, UnsafeArchive
        try:
            return unpack(obj, dest, max_bytes)
        except TooBig as e:
            raise ArtifactTooBig(f"unpacking {where(art)}: {e}") from None
        except (UnsafeArchive, tarfile.TarError) as e:
            raise ArtifactError(f"unpacking {where(art)}: {e}") from None
    size = os.fstat(obj.fileno()).st_size if hasattr(obj, "fileno") else os.path.getsize(obj)
    if size > max_bytes:
        raise ArtifactTooBig(f"{where(art)} is {size} bytes, more than the {max_bytes} bytes the job may "
                             "still write")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / os.path.basename(art.key)
    if hasattr(obj, "read"):
        with open(target, "wb") as out:
            shutil.copyfileobj(obj, out)
    else:
        shutil.copyfile(obj, target)
    return size


def cache_key(art, retry: RetryPolicy) -> str:
    """What the artifact cache knows an immutable object by: its endpoint, bucket, key and ETag,
    asked of the store with the request's own credentials. So a request only ever gets a cached
    copy of an object it has just proved it may read, and a key reused for other bytes is a miss."""
    quick = _quickly(art, lambda q: q.head(art.bucket, art.key))
    if quick is not _SLOW:
        etag = str(quick.get("etag", "")).strip('"') or f"{quick.get('content-length')}-{quick.get('last-modified')}"
        return "\0".join((art.endpoint_url, art.bucket, art.key, etag))
    c = client_for(art)
    head = with_retries(lambda: c.head_object(Bucket=art.bucket, Key=art.key), art, "looking up", retry)
    etag = str(head.get("ETag", "")).strip('"')
    if not etag:
        etag = f"{head.get('ContentLength')}-{head.get('LastModified')}"
    return "\0".join((art.endpoint_url, art.bucket, art.key, etag))


def fetch(art, dest: Path, cache, retry: RetryPolicy, max_bytes: int,
          exists: Optional[bool] = None, known_as: Optional[Callable[[], str]] = None) -> Optional[int]:
    """Bring `art` into the directory `dest`. Immutable: from the cache, else downloaded into
    it. Mutable: downloaded if it exists, else `dest` stays empty (False); `exists=False`
    (a listing did not show it, see `listed`) skips asking the store again; `known_as()` is its
    `cache_key`, asked ahead (runner/lookahead.py). At most `max_bytes`
    are written (ArtifactTooBig). Returns the bytes written, None when a mutable artifact does
    not exist."""
    dest.mkdir(parents=True, exist_ok=True)
    if art.mutable and exists is False:
        return None
    if not art.mutable and cache is not None:
        f = cache.fill(known_as() if known_as else cache_key(art, retry), lambda tmp: download(art, tmp, retry))
        with f:
            return place(art, f, dest, max_bytes)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmpdir:
        tmp = Path(tmpdir) / "object"
        try:
            download(art, tmp, retry)
        except ArtifactMissing:
            if art.mutable:
                return None
            raise
        return place(art, tmp, dest, max_bytes)


def upload(art, src: Path, retry: RetryPolicy, only_uid: Optional[int] = None) -> None:
    """Tar `src` straight into the store: no local copy of the tar (a full disk cannot stop it,
    and a big output costs no disk twice), multipart and parallel for big ones (boto3's
    transfer manager, see _transfer_config), streaming: memory does not grow with the size."""

    def once() -> None:
        with io.BufferedReader(PackedStream(src, only_uid), 1 << 20) as small:
            data = small.read(PART_BYTES + 1)  # a small tar goes in one PUT, without boto3
        if len(data) <= PART_BYTES and _quickly(art, lambda q: q.put(art.bucket, art.key, data)) is not _SLOW:
            return
        data = None  # the small read is not kept while the big one streams
        c = client_for(art)
        stream = PackedStream(src, only_uid)
        with io.BufferedReader(stream, 1 << 20) as body:
            c.upload_fileobj(body, art.bucket, art.key, Config=_transfer_config())

    with_retries(once, art, "uploading", retry)


# ---------------------------------------------------------------- the job's result record

def read_record(art, retry: RetryPolicy) -> Optional[dict]:
    """The result record, or None if there is none (or it is not one of ours)."""
    import json
    quick = _quickly(art, lambda q: q.get(art.bucket, art.key, 1 << 20))
    try:
        if quick is not _SLOW:
            body = quick
        else:
            c = client_for(art)
            body = with_retries(lambda: c.get_object(Bucket=art.bucket, Key=art.key)["Body"].read(1 << 20),
                                art, "reading the result record", retry)
    except ArtifactMissing:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("state") in ("ended", "done") else None


def write_record(art, data: dict, retry: RetryPolicy) -> None:
    import json
    body = json.dumps(data, sort_keys=True).encode()
    if _quickly(art, lambda q: q.put(art.bucket, art.key, body)) is not _SLOW:
        return
    c = client_for(art)
    with_retries(lambda: c.put_object(Bucket=art.bucket, Key=art.key, Body=body,
                                      ContentType="application/json"),
                 art, "writing the result record", retry)
