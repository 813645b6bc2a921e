"""Send a packed workspace to the store at `blobstore/<sha256>.tar`, once."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from appliance.progress import Progress
from appliance.store import sigv4
from appliance.units import format_size
from appliance.workspace import (manifest_key, pack_bytes, pack_directory, recently_changed, total_bytes,
                                 walk, workspace_key)

SINGLE_PUT_MAX = 64 * 2**20  # larger workspaces go with boto3, in parallel parts
MEMORY_PACK_MAX = 8 * 2**20  # files of at most this many bytes are packed in memory, not in a temp file
WARN_BYTES = 2**30           # a folder larger than this gets a hint about .applianceignore
CACHE_ENTRIES = 256          # trees remembered in the workspace cache


class StoreProblem(RuntimeError):
    """The workspace could not be sent; the message says why and what to do."""


def send_workspace(workdir: Path, endpoint: str, access_key: str, secret_key: str, bucket: str,
                   region: str, entries: Optional[list] = None,
                   cache_file: Optional[Path] = None) -> tuple:
    """Pack `workdir` (or the `entries` workspace.walk gave) and put it at
    `blobstore/<sha256>.tar` unless the store holds it already (same tree, same hash): one
    HEAD, then at most one upload. Returns (key, tar size).

    A folder whose files kept their sizes and mtimes since it was last sent is not packed
    again: `cache_file` remembers which tar each such tree gave, and one HEAD proves the store
    still has it. A small workspace goes with two plain HTTP requests
    (appliance.store.sigv4); boto3 takes over for a large one, and for anything the quick
    path did not expect (it retries, and its errors say what is wrong)."""
    def skipped_entry(rel, why):
        print(f"appliance submit: left out {rel}: {why}", file=sys.stderr)

    if entries is None:
        entries = walk(workdir, on_skip=skipped_entry)
    cache_file = cache_file or default_cache_file()
    tree = manifest_key(entries)
    known = _read_cache(cache_file).get(tree)
    if known and _stored(workspace_key(known["sha256"]), endpoint, access_key, secret_key,
                         bucket, region):
        return workspace_key(known["sha256"]), known["size"]

    total = total_bytes(entries)
    if total > WARN_BYTES:
        print(f"appliance submit: the folder holds {format_size(total)}; leave out what the "
              "job does not need with a .applianceignore file (gitignore syntax)", file=sys.stderr)
    began = time.time_ns()
    meter = Progress("packing", total)
    tar = data = None
    if total <= MEMORY_PACK_MAX:
        data, sha = pack_bytes(entries, progress=meter.add)
    else:
        tar, sha = pack_directory(workdir, entries=entries, progress=meter.add)
    meter.close()
    try:
        ws_key = workspace_key(sha)
        size = len(data) if tar is None else tar.stat().st_size
        sent = False
        if size <= SINGLE_PUT_MAX:
            try:
                if not sigv4.exists(endpoint, access_key, secret_key, region, bucket, ws_key):
                    if tar is None:
                        sigv4.put_bytes(endpoint, access_key, secret_key, region, bucket, ws_key, data, sha)
                    else:
                        sigv4.put_file(endpoint, access_key, secret_key, region, bucket, ws_key, tar, sha)
                sent = True
            except sigv4.Unexpected:
                pass
        if not sent:
            if tar is None:
                tar = _in_temp_file(data)  # boto3 uploads a file
            _send_with_boto3(tar, ws_key, endpoint, access_key, secret_key, bucket, region)
        if not recently_changed(entries, began):
            _remember(cache_file, tree, {"sha256": sha, "size": size})
        return ws_key, size
    finally:
        if tar is not None:
            tar.unlink(missing_ok=True)


def _in_temp_file(data: bytes) -> Path:
    import tempfile

    fd, name = tempfile.mkstemp(prefix="workspace-", suffix=".tar")
    try:
        with open(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def default_cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "appliance" / "workspaces.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(path: Path, tree: str, what: dict) -> None:
    """Add `tree -> what` to the cache (the newest CACHE_ENTRIES kept); a cache that cannot
    be written is no error, only slower next time."""
    data = _read_cache(path)
    data.pop(tree, None)
    data[tree] = what
    data = dict(list(data.items())[-CACHE_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass


def _stored(ws_key: str, endpoint: str, access_key: str, secret_key: str, bucket: str,
            region: str) -> bool:
    try:
        return sigv4.exists(endpoint, access_key, secret_key, region, bucket, ws_key)
    except sigv4.Unexpected:
        return False  # pack and send it the usual way, which says what is wrong


def _send_with_boto3(tar: Path, ws_key: str, endpoint: str, access_key: str, secret_key: str,
                     bucket: str, region: str) -> None:
    """Upload in parallel parts, with progress; if anything stops it (Ctrl-C included), the
    multipart upload it began is aborted, so no part is left behind in the store."""
    import signal

    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    from appliance.store.client import check_store, s3_client

    client = s3_client(endpoint, access_key, secret_key, region)
    try:
        if _exists(client, bucket, ws_key):
            return
        began = time.time()
        meter = Progress("uploading", tar.stat().st_size)
        try:
            client.upload_file(str(tar), bucket, ws_key, Callback=meter.add)
        except BaseException:
            # a second Ctrl-C (people press it twice) must not stop the clean-up half way
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                _abort_uploads(client, bucket, ws_key, since=began - 5)
            finally:
                signal.signal(signal.SIGINT, old)
            raise
        finally:
            meter.close()
    except (BotoCoreError, ClientError, S3UploadFailedError) as e:
        # say what is wrong with the store, if something is (it costs a request only now)
        raise StoreProblem(check_store(endpoint, access_key, secret_key, bucket, region)
                           or f"cannot upload the workspace to {endpoint}/{bucket}: {e}") from None


def _abort_uploads(client, bucket: str, key: str, since: float) -> None:
    """Abort the unfinished multipart uploads of `key` begun after `since` (ours)."""
    try:
        listed = client.list_multipart_uploads(Bucket=bucket, Prefix=key)
        for up in listed.get("Uploads", []):
            initiated = up.get("Initiated")
            if up.get("Key") == key and (initiated is None or initiated.timestamp() >= since):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"])
    except Exception as e:  # noqa: BLE001 - the first problem is the one to report
        print(f"appliance submit: could not abort the unfinished upload of {key}: {e}",
              file=sys.stderr)


def _exists(client, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise
