"""The object store's identities, random keys kept in HOME/secrets/store.json (mode 0600).

Two identities: the admin one (creates buckets; used by `up`, the controller and status) and
a client one, scoped to the appliance's buckets (read, write, list, tag objects; no bucket
creation or deletion, no other bucket). Everything that leaves the appliance's own processes
carries the client identity: HOME/secrets/s3.env, the `mc` alias, and the requests `appliance
submit` queues (which dead letters keep).

    {"access_key": ADMIN, "secret_key": ..., "client": {"access_key": ..., "secret_key": ...},
     "members": {"UID": {"name": ..., "bucket": ..., "access_key": ..., "secret_key": ...}}}

Each member of a lab (a local user who submits through the API) gets an identity of their own,
scoped to their own bucket `appliance-u-<name>` (read, write, list, tag; nothing else, no other
bucket), made the first time they use the appliance or by `appliance user add NAME`. Members are
keyed by uid: the kernel's word for who they are.

An external store (object_store.kind = "external") has no identities of ours: put its keys in
store.json; without a `client` entry clients get the admin keys. The same holds for a MinIO
binary (kind = "minio"): its root user is the only identity the appliance makes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass

from appliance.files import write_atomic
from appliance.paths import Home

# The bucket examples/studioml/config.yaml keeps the StudioML client's experiment records in
# (its `database`); `up` creates it, so the client identity needs no right to create buckets.
STUDIOML_META_BUCKET = "studioml-meta"
CLIENT_ACTIONS = ("Read", "Write", "List", "Tagging")
MEMBER_ACTIONS = ("Read", "Write", "List", "Tagging")
MEMBER_BUCKET_PREFIX = "appliance-u-"
_BUCKET_SAFE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")


class CredentialsError(RuntimeError):
    pass


@dataclass(frozen=True)
class StoreCredentials:
    access_key: str
    secret_key: str


def _generate(prefix: str) -> StoreCredentials:
    import secrets  # with hmac, it loads OpenSSL: only where keys are made, not in every reader

    return StoreCredentials(access_key=prefix + secrets.token_hex(8).upper(), secret_key=secrets.token_urlsafe(30))


def ensure_credentials(home: Home, with_client: bool = False) -> StoreCredentials:
    """The admin credentials, generated on first use; `with_client` also makes the client
    identity if store.json has none (the bundled store). Never rotates existing keys."""
    doc = _read(home) if home.store_credentials.exists() else {}
    admin = _credentials(doc, home.store_credentials) if doc else _generate("appl")
    changed = not doc
    if changed:
        doc = {"access_key": admin.access_key, "secret_key": admin.secret_key}
    if with_client and "client" not in doc:
        client = _generate("clnt")
        doc["client"] = {"access_key": client.access_key, "secret_key": client.secret_key}
        changed = True
    if changed:
        home.secrets_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(home.store_credentials, json.dumps(doc, indent=2) + "\n", mode=0o600)
    return admin


def _read(home: Home) -> dict:
    path = home.store_credentials
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError
        return data
    except FileNotFoundError:
        raise CredentialsError(f"{path} is missing: run `appliance up` (or ./install.sh) to generate "
                               "the object-store credentials") from None
    except PermissionError:
        raise CredentialsError(f"{path}: permission denied: run as the user that installed the "
                               "appliance (or with sudo)") from None
    except ValueError:
        raise _damaged(path) from None


def _damaged(path) -> CredentialsError:
    return CredentialsError(f"{path} is damaged: remove it and run `appliance up` to generate new "
                            "credentials (the store then accepts only the new ones)")


def _credentials(data, path) -> StoreCredentials:
    try:
        return StoreCredentials(access_key=data["access_key"], secret_key=data["secret_key"])
    except (KeyError, TypeError):
        raise _damaged(path) from None


def load_credentials(home: Home) -> StoreCredentials:
    """The admin identity."""
    return _credentials(_read(home), home.store_credentials)


def load_client_credentials(home: Home) -> StoreCredentials:
    """The identity clients and requests carry: store.json's `client` entry, else the admin's
    (an external store whose user gave no client keys)."""
    data = _read(home)
    if "client" in data:
        return _credentials(data["client"], home.store_credentials)
    return _credentials(data, home.store_credentials)


def client_buckets(bucket: str) -> list[str]:
    """The buckets the client identity may use: the appliance's and StudioML's records."""
    return [bucket] if bucket == STUDIOML_META_BUCKET else [bucket, STUDIOML_META_BUCKET]


def write_identities(home: Home, bucket: str) -> None:
    """SeaweedFS's `-s3.config`: the admin identity, the client one scoped to `bucket`, and each
    member's scoped to their own bucket. A running store reads it again on SIGHUP."""
    admin = load_credentials(home)
    identities = [{
        "name": "appliance",
        "credentials": [{"accessKey": admin.access_key, "secretKey": admin.secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]
    client = load_client_credentials(home)
    if client != admin:
        identities.append({
            "name": "appliance-client",
            "credentials": [{"accessKey": client.access_key, "secretKey": client.secret_key}],
            "actions": [f"{action}:{b}" for b in client_buckets(bucket) for action in CLIENT_ACTIONS],
        })
    for member in sorted(load_members(home).values(), key=lambda m: m.uid):
        if member.bucket in client_buckets(bucket):
            continue  # never a member's: refuse to hand them the appliance's bucket
        identities.append({
            "name": f"member-{member.uid}",
            "credentials": [{"accessKey": member.access_key, "secretKey": member.secret_key}],
            "actions": [f"{action}:{member.bucket}" for action in MEMBER_ACTIONS],
        })
    write_atomic(home.store_identities, json.dumps({"identities": identities}, indent=2) + "\n", mode=0o600)


# --------------------------------------------------------------------------- members


@dataclass(frozen=True)
class MemberIdentity:
    uid: int
    name: str
    bucket: str
    access_key: str
    secret_key: str


def member_bucket(name: str, uid: int) -> str:
    """`appliance-u-<name>` for a name S3 allows in a bucket name, else `appliance-uid-<uid>`."""
    if _BUCKET_SAFE_NAME.match(name) and "--" not in name:
        return MEMBER_BUCKET_PREFIX + name
    return f"appliance-uid-{int(uid)}"


def is_member_bucket(bucket: str) -> bool:
    return bucket.startswith((MEMBER_BUCKET_PREFIX, "appliance-uid-"))


def load_members(home: Home) -> dict[int, MemberIdentity]:
    """Every member identity in store.json, by uid (none in a home from before members)."""
    doc = _read(home)
    out = {}
    for uid, entry in (doc.get("members") or {}).items():
        try:
            out[int(uid)] = MemberIdentity(uid=int(uid), name=entry["name"], bucket=entry["bucket"],
                                           access_key=entry["access_key"], secret_key=entry["secret_key"])
        except (KeyError, TypeError, ValueError):
            raise _damaged(home.store_credentials) from None
    return out


def ensure_member(home: Home, uid: int, name: str) -> tuple[MemberIdentity, bool]:
    """The member identity of `uid`, made (keys and bucket name) if it has none; (identity, made).
    Serialised by a lock beside store.json, so two first uses make one identity."""
    home.secrets_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(home.secrets_dir / "store.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        found = load_members(home).get(int(uid))
        if found is not None:
            return found, False
        doc = _read(home)
        keys = _generate("memb")
        made = MemberIdentity(uid=int(uid), name=name, bucket=member_bucket(name, uid),
                              access_key=keys.access_key, secret_key=keys.secret_key)
        doc.setdefault("members", {})[str(int(uid))] = {
            "name": made.name, "bucket": made.bucket, "access_key": made.access_key, "secret_key": made.secret_key}
        write_atomic(home.store_credentials, json.dumps(doc, indent=2) + "\n", mode=0o600)
        return made, True
    finally:
        os.close(fd)
