"""Store: the object store as one caller reaches it, what GET /v1/me/store answers (the API's
members.py makes it) and what `appliance submit` uploads with (submit_client.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Store:
    endpoint: str
    region: str
    bucket: str
    access_key: str
    secret_key: str
    private: bool  # the bucket and key are this member's alone
