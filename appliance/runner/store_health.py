"""Store health as one runner sees it: a store endpoint that did not answer is paused.

No request that reads from a paused endpoint is started until the pause ends (a backoff that
doubles per failure, from runner.store_backoff to runner.store_backoff_max); other stores and
queues go on. The first answer ends the pause and resets the backoff.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit


class StoreHealth:
    def __init__(self, backoff_s: float, backoff_max_s: float, own: str = ""):
        self.own_endpoint = own  # this appliance's own store (runner.own_store)
        self.first_backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.backoff = backoff_s
        self.paused_until: dict[str, float] = {}  # store endpoint -> no fetch before

    def down(self, endpoint: str) -> None:
        """Its store did not answer: no fetch from it for a while (backoff)."""
        self.paused_until[endpoint] = time.time() + self.backoff
        self.backoff = min(self.backoff * 2, self.backoff_max_s)

    def up(self, endpoint: str) -> None:
        self.paused_until.pop(endpoint, None)
        self.backoff = self.first_backoff_s

    def paused(self, endpoints, now: float) -> bool:
        """One of `endpoints` did not answer a moment ago."""
        return any(self.paused_until.get(e, 0) > now for e in endpoints)

    def own(self, endpoint: str) -> bool:
        """`endpoint` is this appliance's own store: its outage is the box's, not a request's."""
        return bool(self.own_endpoint) and urlsplit(self.own_endpoint).netloc == urlsplit(endpoint).netloc
