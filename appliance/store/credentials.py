"""The object store's identities, random keys kept in HOME/secrets/store.json (mode 0600).

Two identities: the admin one (creates buckets; used by `up`, the controller and status) and
a client one, scoped to the appliance's buckets (read, write, list, tag objects; no bucket
creation or deletion, no other bucket). Everything that leaves the appliance's own processes
carries the client identity: HOME/secrets/s3.env, the `mc` alias, and the requests `appliance
submit` queues (which dead letters keep).

    {"access_key": ADMIN, "secret_key": ..., "client": {"access_key": ..., "secret_key": ...}}

An external store (object_store.kind = "external") has no identities of ours: put its keys in
store.json; without a `client` entry clients get the admin keys. The same holds for a MinIO
binary (kind = "minio"): its root user is the only identity the appliance makes.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from appliance.files import write_atomic
from appliance.paths import Home

# The bucket examples/studioml/config.yaml keeps the StudioML client's experiment records in
# (its `database`); `up` creates it, so the client identity needs no right to create buckets.
STUDIOML_META_BUCKET = "studioml-meta"
CLIENT_ACTIONS = ("Read", "Write", "List", "Tagging")


class CredentialsError(RuntimeError):
    pass


@dataclass(frozen=True)
class StoreCredentials:
    access_key: str
    secret_key: str


def _generate(prefix: str) -> StoreCredentials:
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
    """SeaweedFS's `-s3.config`: the admin identity, and the client one scoped to `bucket`."""
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
    write_atomic(home.store_identities, json.dumps({"identities": identities}, indent=2) + "\n", mode=0o600)
