"""The runner's side of the job table: what a runner asks before it starts a claimed request,
and what it records as the job goes on. The runner calls these at a few places of a job's life
(appliance/runner/); the rules live here.

- `claim`: before a claimed request starts. "run" (its row is now `running` on this slot),
  "held" (held, or its array is at its `%N` bound: give the message back uncounted),
  "cancelled" (cancelled while it waited, here or in the ledger: settle it unrun),
  "duplicate" (another account's local message already holds this key on this box, e.g. a
  member reusing another member's key to take over its row: dead-letter it; the same owner's
  request again goes on, and the exactly-once ledger settles a finished one as it ended).
- `cancel_requested`: asked each supervision tick of a running job (one indexed SELECT, at
  most once a second); true once someone ran `appliance cancel` on it.
- `ended`, `given_back`: how it ended (done, failed, cancelled with the report's figures), or
  that it did not end and waits again.

The table is a record, never a gate a broken disk can close: any error of SQLite is logged and
the job goes on ("run"), as it did before the table existed.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from appliance.jobs import policy
from appliance.jobs.intake import job_from_request
from appliance.jobs.table import CANCELLED, DONE, FAILED, FINISHED, HELD, RUNNING, JobTable

log = logging.getLogger(__name__)

RUN, HOLD, CANCEL, DUPLICATE = "run", "held", "cancelled", "duplicate"
CANCEL_POLL_S = 1.0


def state_of(outcome: str, cls: Optional[str]) -> str:
    """The table state a runner's outcome ends in."""
    if outcome == "success":
        return DONE
    if outcome == "cancelled" or cls == "cancelled":
        return CANCELLED
    return FAILED


def _owner_of(msg) -> Optional[int]:
    """The uid that owns a local queue message's file (the kernel's word); None elsewhere."""
    handle = getattr(msg, "handle", None)
    if getattr(msg, "source", None) == "local" and isinstance(handle, (str, os.PathLike)):
        try:
            return os.stat(handle, follow_symlinks=False).st_uid
        except OSError:
            return None
    return None


class RunnerRecord:
    def __init__(self, home, slot: str, poll_s: float = CANCEL_POLL_S):
        self.home, self.slot, self.poll_s = home, slot, poll_s
        self._table: Optional[JobTable] = None
        self._next_poll: dict[str, float] = {}
        self._cancelled: set[str] = set()

    @property
    def table(self) -> JobTable:
        if self._table is None:
            self._table = JobTable.of(self.home)
        return self._table

    def close(self) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None

    def claim(self, msg, key: str) -> str:
        """RUN, HOLD or CANCEL for a claimed message whose request has `key` (module doc)."""
        try:
            return self._claim(msg, key)
        except Exception:  # noqa: BLE001 - the record must not stop the work
            log.exception("job table: claim of %s", key)
            return RUN

    def _claim(self, msg, key: str) -> str:
        t = self.table
        attempt = getattr(msg, "attempt", None)
        row = t.get(key)
        if row is None:
            job = job_from_request(msg.body, owner_uid=_owner_of(msg), queue=msg.queue, source=msg.source,
                                   message_id=msg.message_id)
            if job is None:
                return RUN  # no usable key: triage already settles such a message
            waits_for_nothing = not (job.array_base and job.array_limit)
            if waits_for_nothing:  # added running, in one write (not queued, then running: two)
                job.state, job.slot, job.started = RUNNING, self.slot, time.time()
                job.attempts = attempt if attempt is not None else 1
            if t.add(job, msg.body) and waits_for_nothing:  # the body kept for requeue and cancel
                return RUN
            row = t.get(key)  # (or another runner added it meanwhile: as if it had been there)
        elif row.message_id and msg.source == "local" and row.source == "local" and row.message_id != msg.message_id \
                and _owner_of(msg) != row.owner_uid:
            return DUPLICATE  # another account's message taking over this key's row
        # (the same owner's request again, copied back or sent twice: the ledger decides, and a
        # finished one is settled as it ended, never run twice)
        if row.state in (CANCELLED,):
            return CANCEL
        if row.state == HELD:
            return HOLD
        if row.array_base and row.array_limit and row.state != RUNNING and \
                t.running_in_array(row.array_base, row.owner_uid) >= row.array_limit:
            return HOLD
        if t.started(key, self.slot, attempt):
            return RUN
        row = t.get(key)
        if row.state == CANCELLED:
            return CANCEL
        if row.state == HELD:
            return HOLD
        if row.state == RUNNING and row.cancel_requested:  # cancelled while its runner was gone
            t.ended(key, CANCELLED, cls="cancelled", reason="cancelled while its runner was gone")
            return CANCEL
        if row.state == RUNNING:  # its runner died mid-job and the message came back: run it here
            t.restarted(key, self.slot, attempt)
        return RUN  # finished before: the result record in the store decides (never runs twice)

    def fair_first(self, queue: str, n: int = 8) -> tuple:
        """Message ids of `queue`'s waiting local jobs in fair-share order (policy.fair_order),
        the first `n`; () when one owner or none waits there (FIFO is then the fair order)."""
        try:
            t = self.table
            owners = t.waiting_owners(queue)
            if len(owners) < 2:
                return ()
            waiting = [w for w in t.waiting_in(queue) if w[3]]
            last = t.last_started_by_owner(owners)
            order = policy.fair_order([policy.Waiting(key, uid, at or 0) for key, uid, at, _ in waiting], last)
            ids = {w[0]: w[3] for w in waiting}
            return tuple(ids[k] for k in order[:n])
        except Exception:  # noqa: BLE001 - FIFO, as before the table
            log.exception("job table: fair-share order of %s", queue)
            return ()

    def cancel_requested(self, key: str) -> bool:
        """Whether the running job `key` was cancelled (asked at most once a second)."""
        if key in self._cancelled:
            return True
        now = time.monotonic()
        if now < self._next_poll.get(key, 0.0):
            return False
        self._next_poll = {key: now + self.poll_s}
        try:
            if self.table.cancel_requested(key):
                self._cancelled.add(key)
                return True
        except Exception:  # noqa: BLE001
            log.exception("job table: cancel of %s", key)
        return False

    def ended(self, key: str, outcome: str, cls: Optional[str], exit_code: Optional[int], reason: str = "",
              report: Optional[dict] = None) -> None:
        report = report or {}
        self._cancelled.discard(key)
        try:
            self.table.ended(key, state_of(outcome, cls), cls=cls, reason=reason or None, exit_code=exit_code,
                             peak_memory_bytes=report.get("peak_memory_bytes"),
                             cpu_seconds=report.get("cpu_seconds"), wall_seconds=report.get("wall_seconds"))
        except Exception:  # noqa: BLE001
            log.exception("job table: end of %s", key)

    def finished(self, key: str, outcome: str, cls: Optional[str], exit_code: Optional[int], reason: str = "",
                 report: Optional[dict] = None) -> None:
        """What the runner says at the end of each try: given back (released, drained: it runs
        again) or ended."""
        if outcome in ("released", "interrupted"):
            self.given_back(key, reason)
        else:
            self.ended(key, outcome, cls, exit_code, reason, report)

    def given_back(self, key: str, reason: str = "") -> None:
        self._cancelled.discard(key)
        try:
            self.table.given_back(key, reason)
        except Exception:  # noqa: BLE001
            log.exception("job table: %s given back", key)

    def is_finished(self, key: str) -> bool:
        try:
            row = self.table.get(key)
        except Exception:  # noqa: BLE001
            return False
        return row is not None and row.state in FINISHED
