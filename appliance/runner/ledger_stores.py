"""Where the exactly-once ledger keeps its records (see ledger.py for what they say).

- `LocalLedger`: HOME/ledger/<entry>.json on this box, root's alone (0700/0600), written
  atomically and durably. Always there: one box never runs a finished request twice even when
  no store is configured.
- `StoreLedger`: the same records in the appliance's own store, bucket `appliance-ledger`,
  read and written with the appliance's admin identity (secrets/store.json). The scoped client
  identity every request carries may use only the appliance's artifact bucket and StudioML's
  records (store/credentials.py: `client_buckets`), so no submitter can write here. Appliances
  that share one store (object_store.kind = "external", the same keys) share this ledger, and
  with it what runs where.

An entry is named by (bucket of the request's workspace, experiment key), readable and hashed so
that distinct pairs never share a name and no bucket or key can reach outside the folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from appliance.files import write_atomic
from appliance.studioml.keys import job_dir_name

log = logging.getLogger("appliance.runner")

LEDGER_BUCKET = "appliance-ledger"


class LedgerUnavailable(Exception):
    """The store ledger did not answer; the local ledger still holds."""


def entry_name(bucket: str, key: str) -> str:
    return job_dir_name(f"{bucket}/{key}") + ".json"


class LocalLedger:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _ensure(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
        if self.root.stat().st_mode & 0o077:
            os.chmod(self.root, 0o700)

    def read(self, name: str) -> Optional[dict]:
        try:
            data = json.loads((self.root / name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write(self, name: str, record: dict, durable: bool = True) -> None:
        """`durable`: the record survives a power cut (final records, cancels); a running one
        need not (lost, its job is taken for interrupted, which it then was)."""
        self._ensure()
        write_atomic(self.root / name, json.dumps(record, sort_keys=True), mode=0o600, durable=durable,
                     sync=durable)


class StoreLedger:
    def __init__(self, endpoint_url: str, access_key: str, secret_key: str, region: str = "us-east-1"):
        self.endpoint_url = endpoint_url
        self._keys = (access_key, secret_key, region)
        self._client = None
        self._bucket_ready = False
        self._lite = None  # store/lite.py's client, made at the first request

    @classmethod
    def for_home(cls, home, config) -> Optional["StoreLedger"]:
        """The appliance's own store with its admin identity; None when this home has none."""
        try:
            from appliance.store.credentials import load_credentials
            from appliance.store.server import endpoint_url
            if not Path(home.store_credentials).is_file():
                return None
            creds = load_credentials(home)
            return cls(endpoint_url(config), creds.access_key, creds.secret_key, config.object_store.region)
        except Exception as e:  # noqa: BLE001 - no store ledger: the local one still holds
            log.warning("the store ledger is off (%s); finished work is known on this box only", e)
            return None

    def client(self):
        if self._client is None:
            from appliance.store.client import s3_client
            access, secret, region = self._keys
            self._client = s3_client(self.endpoint_url, access, secret, region, connect_timeout=2,
                                     read_timeout=10, attempts=2)
        return self._client

    def _object(self, name: str) -> str:
        return f"v1/{name}"

    def _quick(self, op):
        """op(a store/lite.py client): no boto3 in the runner for these small requests; on
        anything but the expected answer, the caller does the same with boto3."""
        from appliance.store import lite
        try:
            if self._lite is None:
                access, secret, region = self._keys
                self._lite = lite.Client(self.endpoint_url, access, secret, region, timeout=10)
            return op(self._lite)
        except lite.Unexpected:
            return lite.Unexpected

    def read(self, name: str) -> Optional[dict]:
        from appliance.store import lite
        body = self._quick(lambda c: c.get_if_there(LEDGER_BUCKET, self._object(name), 1 << 20))
        if body is None:
            return None
        if body is not lite.Unexpected:
            try:
                data = json.loads(body)
            except ValueError:
                return None
            return data if isinstance(data, dict) else None
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            body = self.client().get_object(Bucket=LEDGER_BUCKET, Key=self._object(name))["Body"].read(1 << 20)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
                return None
            raise LedgerUnavailable(f"{code}: {e}") from None
        except BotoCoreError as e:
            raise LedgerUnavailable(str(e)) from None
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def write(self, name: str, record: dict) -> None:
        from appliance.store import lite
        body = json.dumps(record, sort_keys=True).encode()
        if self._quick(lambda c: c.put(LEDGER_BUCKET, self._object(name), body)) is not lite.Unexpected:
            return
        from botocore.exceptions import BotoCoreError, ClientError
        for _ in range(2):
            try:
                self.client().put_object(Bucket=LEDGER_BUCKET, Key=self._object(name), Body=body,
                                         ContentType="application/json")
                return
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                if code == "NoSuchBucket" and not self._bucket_ready:
                    self._make_bucket()
                    continue
                raise LedgerUnavailable(f"{code}: {e}") from None
            except BotoCoreError as e:
                raise LedgerUnavailable(str(e)) from None

    def _make_bucket(self) -> None:
        from botocore.exceptions import ClientError
        self._bucket_ready = True
        try:
            self.client().create_bucket(Bucket=LEDGER_BUCKET)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code", "") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise LedgerUnavailable(str(e)) from None
