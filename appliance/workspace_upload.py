"""Send a packed workspace to the store at `blobstore/<sha256>.tar`, once."""

from __future__ import annotations

import sys
from pathlib import Path

from appliance.store import sigv4
from appliance.workspace import pack_directory, workspace_key

SINGLE_PUT_MAX = 64 * 2**20  # larger workspaces go with boto3, in parallel parts


class StoreProblem(RuntimeError):
    """The workspace could not be sent; the message says why and what to do."""


def send_workspace(workdir: Path, endpoint: str, access_key: str, secret_key: str, bucket: str,
                   region: str) -> tuple:
    """Pack `workdir` and put it at `blobstore/<sha256>.tar` unless the store holds it already
    (same tree, same hash): one HEAD, then at most one upload. Returns (key, tar size).

    A small workspace goes with two plain HTTP requests (appliance.store.sigv4); boto3 takes
    over for a large one, and for anything the quick path did not expect (it retries, and
    its errors say what is wrong)."""
    def skipped_entry(rel, why):
        print(f"appliance submit: left out {rel}: {why}", file=sys.stderr)

    tar, sha = pack_directory(workdir, on_skip=skipped_entry)
    try:
        ws_key, size = workspace_key(sha), tar.stat().st_size
        if size <= SINGLE_PUT_MAX:
            try:
                if not sigv4.exists(endpoint, access_key, secret_key, region, bucket, ws_key):
                    sigv4.put_file(endpoint, access_key, secret_key, region, bucket, ws_key, tar, sha)
                return ws_key, size
            except sigv4.Unexpected:
                pass
        _send_with_boto3(tar, ws_key, endpoint, access_key, secret_key, bucket, region)
        return ws_key, size
    finally:
        tar.unlink(missing_ok=True)


def _send_with_boto3(tar: Path, ws_key: str, endpoint: str, access_key: str, secret_key: str,
                     bucket: str, region: str) -> None:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    from appliance.store.client import check_store, s3_client

    client = s3_client(endpoint, access_key, secret_key, region)
    try:
        if not _exists(client, bucket, ws_key):
            client.upload_file(str(tar), bucket, ws_key)  # in parallel parts when large
    except (BotoCoreError, ClientError, S3UploadFailedError) as e:
        # say what is wrong with the store, if something is (it costs a request only now)
        raise StoreProblem(check_store(endpoint, access_key, secret_key, bucket, region)
                           or f"cannot upload the workspace to {endpoint}/{bucket}: {e}") from None


def _exists(client, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise
