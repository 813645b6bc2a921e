"""The store requests a job's fetch needs, asked while the runner still gets the job ready;
and the ones a finished job's records need, asked at once (`together`).

Once triage decided a request runs here, its fetch will ask the store whether its mutable
artifacts exist (one LIST, `transfer.listed`) and what its immutable ones are now (a HEAD each,
`transfer.cache_key`: the cache serves only an object the request just proved it may read).
Those round trips do not depend on each other nor on what the runner writes meanwhile (its
job table, job folder, status, ledger record), so a second thread asks them at once and the
fetch takes the answers: the same requests, with the request's own credentials, answered or
failed as they would be in line.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Optional

from appliance.studioml import transfer
from appliance.studioml.artifacts import result_record


class Asked:
    """What was asked for one request: `listed()` and `cache_key(name)` give the answers (or
    raise what asking raised)."""

    def __init__(self, listed: Future, heads: dict[str, Future]):
        self._listed, self._heads = listed, heads

    def listed(self) -> dict:
        return self._listed.result()

    def cache_key(self, name: str) -> Optional[Callable[[], str]]:
        head = self._heads.get(name)
        return head.result if head is not None else None


class Lookahead:
    def __init__(self):
        self._pool: Optional[ThreadPoolExecutor] = None

    def ask(self, req, retry: transfer.RetryPolicy, cached: bool) -> Asked:
        """Start asking for `req`'s artifacts (`cached`: its immutable ones come through the cache)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lookahead")
        arts = list(req.artifacts.values())
        record = result_record(req.artifacts)
        mutable = [a for a in arts if a.mutable] + ([record] if record else [])
        listed = self._pool.submit(transfer.listed, mutable, retry)
        heads = {a.name: self._pool.submit(transfer.cache_key, a, retry)
                 for a in arts if not a.mutable and cached} if cached else {}
        return Asked(listed, heads)

    def together(self, *calls: Callable[[], object], here: Optional[Callable[[], object]] = None) -> list:
        """Run `calls` at once (store requests that do not depend on each other), and `here` in
        this thread meanwhile (a local write); their results (`here`'s last), or the first one's
        exception once all ended."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lookahead")
        futures = [self._pool.submit(c) for c in calls]
        try:
            mine = [here()] if here is not None else []
        finally:
            wait(futures)
        return [f.result() for f in futures] + mine

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
