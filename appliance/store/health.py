"""The store's health as `status`, `doctor` and `/metrics` report it: one line, or None.

Healthy means it answers the appliance's own identity, has the bucket and takes a write (a
small object put and deleted). A bundled store whose disk is full says so first: its writes
fail, or soon will, whatever a probe finds."""

from __future__ import annotations

from appliance.config import Config
from appliance.paths import Home


def store_problem(home: Home, config: Config, write: bool = True) -> str | None:
    from appliance.store.client import check_store
    from appliance.store.credentials import CredentialsError, load_credentials
    from appliance.store.server import StoreError, endpoint_url
    from appliance.store.watchdog import disk_full_problem

    try:
        endpoint = endpoint_url(config)
        creds = load_credentials(home)
    except (StoreError, CredentialsError) as e:
        return str(e)
    if config.object_store.kind != "external":
        full = disk_full_problem(home.store_data)
        if full:
            return full
    return check_store(endpoint, creds.access_key, creds.secret_key, config.object_store.bucket,
                       config.object_store.region, write=write)
