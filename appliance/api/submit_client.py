"""Where `appliance submit` sends a workspace and a request: the caller's own store and the API.

A member (any caller but root) asks the API for their store identity (made on first use) and
sends the request through it; the API writes it to the queue as theirs. Root, who may read the
home, keeps the appliance's client identity and writes the queue itself.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from appliance.api.store_access import Store
from appliance.paths import Home

# Where root's submit remembers the store's place (endpoint, region, bucket) that appliance.toml
# gives: importing and running the config schema is ~10 ms of a quick submit.
PLACE_FILE = "submit-store.json"
_CODE = Path(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the appliance package
SETTLED_S = 2.0  # a file changed more recently may change again within the same mtime tick


def submit_store(home: Home) -> Store:
    """The store a submit uploads to, with the caller's own key (never the admin identity)."""
    if os.geteuid() != 0:
        from appliance.api.client import Client

        s = Client(home).get("/v1/me/store")
        return Store(endpoint=s["endpoint"], region=s["region"], bucket=s["bucket"], access_key=s["access_key"],
                     secret_key=s["secret_key"], private=bool(s["private"]))
    from appliance.store.credentials import load_client_credentials

    endpoint, region, bucket = store_place(home)
    creds = load_client_credentials(home)
    return Store(endpoint=endpoint, region=region, bucket=bucket,
                 access_key=creds.access_key, secret_key=creds.secret_key, private=False)


def store_place(home: Home) -> tuple[str, str, str]:
    """(endpoint, region, bucket) of the store, as appliance.toml says (ConfigError, StoreError
    when it cannot). Root remembers them in HOME/run/submit-store.json beside a signature of
    appliance.toml and of the code that reads it: while neither changed, they are taken from
    there and the config schema is not even imported."""
    signature = _place_signature(home)
    remembered = home.run_dir / PLACE_FILE
    try:
        doc = json.loads(remembered.read_text())
        if doc["signature"] == signature:
            endpoint, region, bucket = doc["endpoint"], doc["region"], doc["bucket"]
            if all(isinstance(v, str) and v for v in (endpoint, region, bucket)):
                return endpoint, region, bucket
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from appliance.config import load_config
    from appliance.store.server import endpoint_url

    config = load_config(home.config_file)
    place = endpoint_url(config), config.object_store.region, config.object_store.bucket
    if os.geteuid() == 0 and home.run_dir.is_dir() and _settled(signature):  # `up` makes the folder
        from appliance.files import write_atomic

        try:
            write_atomic(remembered, json.dumps({"signature": signature, "endpoint": place[0], "region": place[1],
                                                 "bucket": place[2]}) + "\n", mode=0o644,
                         sync=False)  # a power cut that loses it only costs the next submit the schema
        except OSError:
            pass  # only slower next time
    return place


def _settled(signature: list) -> bool:
    """Whether none of the files changed in the last SETTLED_S (so its stat is proof of its content)."""
    now = time.time_ns()
    return all(entry[1] is None or now - entry[3] > SETTLED_S * 1e9 for entry in signature)


def _place_signature(home: Home) -> list:
    """What the store's place is made from: appliance.toml (or its absence) and the code that reads it."""
    out = []
    for path in (home.config_file, _CODE / "config.py", _CODE / "store" / "server.py"):
        try:
            st = os.stat(path)
            out.append([str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
        except OSError:
            out.append([str(path), None])
    return out


class QueueRefused(Exception):
    """The job table refused the request (root's path; the API says the same to a member)."""


def enqueue_request(home: Home, queue: str, data: bytes) -> str:
    """Queue the request `data` on `queue`; its message id. PermissionError (root's path) when the
    queue folder refuses, QueueRefused when the job table does (its key is a job already),
    ApiClientError (a member's) with the API's line."""
    if os.geteuid() != 0:
        from appliance.api.client import Client

        return Client(home).post("/v1/submit", {"queue": queue, "request": json.loads(data)})["message_id"]
    from appliance.jobs.control import JobError, queued
    from appliance.jobs.table import JobTable
    from appliance.queues.local_write import enqueue

    ids = []
    table = JobTable.of(home)  # its row first: `appliance wait KEY` right after finds it
    try:
        queued(table, data, owner_uid=0, queue=queue,
               enqueue=lambda q, b: ids.append(enqueue(home.queue_root, q, b)) or ids[-1])
    except JobError as e:
        raise QueueRefused(e.message) from None
    finally:
        table.close()
    return ids[-1]


def results_store(home: Home, record: dict) -> Store:
    """The identity that reads a job's outputs: a member's own (their bucket); root's client
    identity, or the admin's when the job's record names a member's bucket."""
    mine = submit_store(home)
    if mine.private:
        return mine
    from appliance.store.credentials import is_member_bucket, load_credentials

    buckets = {a.get("bucket") for a in (record.get("artifacts") or {}).values() if isinstance(a, dict)}
    member = next((b for b in buckets if isinstance(b, str) and is_member_bucket(b)), None)
    if member is None:
        return mine
    admin = load_credentials(home)
    return Store(endpoint=mine.endpoint, region=mine.region, bucket=member, access_key=admin.access_key,
                 secret_key=admin.secret_key, private=False)
