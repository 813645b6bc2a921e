"""S3 clients for the appliance's store and for the endpoints named in experiment requests."""

from __future__ import annotations


def s3_client(endpoint_url: str, access_key: str | None, secret_key: str | None,
              region: str | None = "us-east-1", session_token: str | None = None,
              connect_timeout: float = 5, read_timeout: float = 60, attempts: int = 3):
    """A boto3 S3 client with path-style addressing (what SeaweedFS and MinIO expect).

    boto3 is imported here, not with the module: it costs ~20 MB of RSS, which the controller
    and an idle runner never need."""
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        aws_session_token=session_token,
        region_name=region or "us-east-1",
        config=BotoConfig(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": attempts, "mode": "standard"},
        ),
    )


PROBE_PREFIX = ".appliance/probe/"  # where the write probe puts (and at once deletes) its object


def check_store(endpoint_url: str, access_key: str, secret_key: str, bucket: str,
                region: str = "us-east-1", write: bool = True) -> str | None:
    """None when the store answers our credentials, has `bucket` and (with `write`) stores and
    deletes a small object in it; else what is wrong and the fix. A healthy store is asked through
    the standard library (lite.py: no boto3 in the controller's periodic checks); any other answer
    is asked again with boto3, which explains it."""
    if _healthy_quick(endpoint_url, access_key, secret_key, bucket, region, write):
        return None
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(endpoint_url, access_key, secret_key, region, connect_timeout=2, read_timeout=5,
                       attempts=1)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket") or status == 404:
            return f"bucket '{bucket}' does not exist at {endpoint_url}: `appliance up` creates it"
        if status == 403 or code in ("403", "SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"):
            return (f"{endpoint_url} refused the appliance's credentials ({code or status}): "
                    "check secrets/store.json against the store's identities (`appliance render` then restart)")
        return f"{endpoint_url} answered {code or status}: {e}"
    except BotoCoreError as e:
        return f"cannot reach the object store at {endpoint_url}: {e}; is it running? (`appliance status`)"
    return _probe_write(client, bucket) if write else None


def _healthy_quick(endpoint_url: str, access_key: str, secret_key: str, bucket: str, region: str,
                   write: bool) -> bool:
    from appliance.store import lite

    try:
        client = lite.Client(endpoint_url, access_key, secret_key, region, timeout=5)
        try:
            client.head_bucket(bucket)
            if write:
                key = _probe_key()
                client.put(bucket, key, b"probe")
                client.delete(bucket, key)
        finally:
            client.close()
    except lite.Unexpected:
        return False
    return True


def _probe_key() -> str:
    import os
    import socket

    return f"{PROBE_PREFIX}{socket.gethostname()}-{os.getpid()}"


def _probe_write(client, bucket: str) -> str | None:
    """Put a small object and delete it: a store that answers may still fail every write."""
    from botocore.exceptions import BotoCoreError, ClientError

    key = _probe_key()
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"probe")
        client.delete_object(Bucket=bucket, Key=key)
    except ClientError as e:
        error = e.response.get("Error", {})
        return (f"store cannot write: a probe object answered {error.get('Code') or 'an error'} "
                f"({error.get('Message') or e}); see the store's log (logs/store.log)")
    except BotoCoreError as e:
        return f"store cannot write: {e}; see the store's log (logs/store.log)"
    return None


def ensure_bucket(endpoint_url: str, access_key: str, secret_key: str, bucket: str,
                  region: str = "us-east-1") -> None:
    from botocore.exceptions import ClientError

    client = s3_client(endpoint_url, access_key, secret_key, region)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)
