"""Members' store identities, made and put to work: the key, the bucket, the store told of them.

`member_store` is what the API answers a member who asks for their store (GET /v1/me/store) and
what `appliance user add` does as root: make the identity if there is none (store.json), write
the store's identities file, have the running store read it again (SIGHUP to the `store`
program), make the member's bucket with the admin identity, and wait until the new key answers.
Only the bundled store (SeaweedFS) has identities of ours; with another store every member gets
the client identity and the shared bucket, and `private` says so.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from appliance.api.store_access import Store  # noqa: F401 - where the API's routes find it
from appliance.paths import Home
from appliance.store.credentials import (CredentialsError, MemberIdentity, ensure_member, load_client_credentials,
                                         load_credentials, write_identities)

KEY_READY_S = 15.0
_made_buckets: set[tuple[str, str]] = set()
_lock = threading.Lock()


class MemberStoreError(CredentialsError):
    """The member's identity could not be put to work; one line."""


def reload_store(home: Home) -> None:
    """Have the running bundled store read its identities again (its sandbox passes SIGHUP on)."""
    import xmlrpc.client

    from appliance import supervisor

    try:
        supervisor.rpc(home).supervisor.signalProcess("store", "HUP")
        return
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        pass
    from appliance import singleton

    for pid in singleton.holders(singleton.lock_path(home.run_dir, "store")):
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            pass


def _ensure_bucket(config, endpoint: str, bucket: str, home: Home) -> None:
    if (endpoint, bucket) in _made_buckets:
        return
    from appliance.store.client import ensure_bucket

    admin = load_credentials(home)
    ensure_bucket(endpoint, admin.access_key, admin.secret_key, bucket, config.object_store.region)
    _made_buckets.add((endpoint, bucket))


def _wait_for_key(endpoint: str, region: str, member: MemberIdentity) -> str | None:
    """Until the store takes the member's key for their bucket; the last problem, or None."""
    from appliance.store.client import check_store

    deadline = time.monotonic() + KEY_READY_S
    while True:
        problem = check_store(endpoint, member.access_key, member.secret_key, member.bucket, region)
        if problem is None or time.monotonic() > deadline:
            return problem
        time.sleep(0.2)


def member_store(home: Home, config, uid: int, name: str, running: bool = True) -> Store:
    """The store identity of member `uid` (made on first use), ready to use when `running`."""
    from appliance.store.server import endpoint_url

    endpoint, region = endpoint_url(config), config.object_store.region
    if config.object_store.kind != "seaweedfs":
        client = load_client_credentials(home)
        return Store(endpoint, region, config.object_store.bucket, client.access_key, client.secret_key, False)
    with _lock:
        member, made = ensure_member(home, uid, name)
        if member.bucket == config.object_store.bucket:
            raise MemberStoreError(f"the member bucket {member.bucket} is the appliance's own bucket "
                                   "(object_store.bucket): choose another object_store.bucket")
        if made:
            write_identities(home, config.object_store.bucket)
            if running:
                reload_store(home)
        if running:
            try:
                _ensure_bucket(config, endpoint, member.bucket, home)
            except Exception as e:  # noqa: BLE001 - said in one line
                raise MemberStoreError(f"cannot make the bucket {member.bucket} for {name}: {e}") from None
            problem = _wait_for_key(endpoint, region, member) if made else None
            if problem:
                raise MemberStoreError(f"the store does not take {name}'s new key yet: {problem}; try again "
                                       "in a moment")
    return Store(endpoint, region, member.bucket, member.access_key, member.secret_key, True)


def environment_lines(store: Store) -> str:
    """`export` lines for `aws s3`, boto3 and the StudioML client."""
    env = {"AWS_ACCESS_KEY_ID": store.access_key, "AWS_SECRET_ACCESS_KEY": store.secret_key,
           "AWS_ENDPOINT_URL": store.endpoint, "AWS_DEFAULT_REGION": store.region,
           "APPLIANCE_BUCKET": store.bucket}
    return "".join(f"export {k}={v}\n" for k, v in env.items())
