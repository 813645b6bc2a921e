"""The object store's one identity: a random access key and secret, kept in the home, mode 0600."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from appliance.files import write_atomic
from appliance.paths import Home


class CredentialsError(RuntimeError):
    pass


@dataclass(frozen=True)
class StoreCredentials:
    access_key: str
    secret_key: str


def ensure_credentials(home: Home) -> StoreCredentials:
    """Load the store credentials, generating them on first use. Never rotates existing ones."""
    if home.store_credentials.exists():
        return load_credentials(home)
    creds = StoreCredentials(access_key="appl" + secrets.token_hex(8).upper(),
                             secret_key=secrets.token_urlsafe(30))
    home.secrets_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(home.store_credentials,
                 json.dumps({"access_key": creds.access_key, "secret_key": creds.secret_key}, indent=2) + "\n",
                 mode=0o600)
    return creds


def load_credentials(home: Home) -> StoreCredentials:
    path = home.store_credentials
    try:
        data = json.loads(path.read_text())
        return StoreCredentials(access_key=data["access_key"], secret_key=data["secret_key"])
    except FileNotFoundError:
        raise CredentialsError(f"{path} is missing: run `appliance up` (or ./install.sh) to generate "
                               "the object-store credentials") from None
    except PermissionError:
        raise CredentialsError(f"{path}: permission denied: run as the user that installed the "
                               "appliance (or with sudo)") from None
    except (ValueError, KeyError, TypeError):
        raise CredentialsError(f"{path} is damaged: remove it and run `appliance up` to generate new "
                               "credentials (the store then accepts only the new ones)") from None


def write_identities(home: Home, creds: StoreCredentials) -> None:
    """SeaweedFS's `-s3.config`: the generated credentials are its only identity."""
    doc = {"identities": [{
        "name": "appliance",
        "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}
    write_atomic(home.store_identities, json.dumps(doc, indent=2) + "\n", mode=0o600)
