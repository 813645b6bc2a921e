"""Where `appliance submit` sends a workspace and a request: the caller's own store and the API.

A member (any caller but root) asks the API for their store identity (made on first use) and
sends the request through it; the API writes it to the queue as theirs. Root, who may read the
home, keeps the appliance's client identity and writes the queue itself.
"""

from __future__ import annotations

import json
import os

from appliance.api.store_access import Store
from appliance.paths import Home


def submit_store(home: Home) -> Store:
    """The store a submit uploads to, with the caller's own key (never the admin identity)."""
    if os.geteuid() != 0:
        from appliance.api.client import Client

        s = Client(home).get("/v1/me/store")
        return Store(endpoint=s["endpoint"], region=s["region"], bucket=s["bucket"], access_key=s["access_key"],
                     secret_key=s["secret_key"], private=bool(s["private"]))
    from appliance.config import load_config
    from appliance.store.credentials import load_client_credentials
    from appliance.store.server import endpoint_url

    config = load_config(home.config_file)
    creds = load_client_credentials(home)
    return Store(endpoint=endpoint_url(config), region=config.object_store.region, bucket=config.object_store.bucket,
                 access_key=creds.access_key, secret_key=creds.secret_key, private=False)


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
