"""Shared queues (RabbitMQ, SQS): what one runner remembers of the messages it refused.

A message no slot of this appliance could ever run is given back for the other appliances,
uncounted, with this appliance added to its refusal record (appliance/queues/refusals.py); it
is left alone here for a while (per message, a backoff), and a queue that holds nothing else
goes quiet until a message arrives or a wait ends. Once the fleet has shown that nobody can
run it (queues.unrunnable_after_refusals appliances, or queues.unrunnable_after since the first
refusal) it is dead-lettered. A new plan forgets every refusal.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from appliance.queues import refusals
from appliance.runner import classes
from appliance.studioml.request import Request

log = logging.getLogger("appliance.runner")

QUIET_BLIND_S = 10.0  # a queue of refused messages whose depth we cannot see is looked at this often


class FleetRefusals:
    def __init__(self, home, slot: str, settings):
        self.home, self.slot, self.settings = home, slot, settings
        self.refused = refusals.Backoff(settings.refusal_backoff_s, settings.refusal_backoff_max_s)
        self.quiet: dict[tuple, tuple] = {}  # (source, queue) -> (until, depth): holds only refused messages
        self._appliance_id: Optional[str] = None
        self._plan_sig = None

    @property
    def appliance_id(self) -> str:
        if self._appliance_id is None:
            from appliance.identity import appliance_id
            self._appliance_id = appliance_id(self.home)
        return self._appliance_id

    def keep_current(self) -> None:
        """A new plan (a GPU came, slots changed) may run what was refused: forget the refusals.
        Refusals of messages not seen again for long (another box ran them) go too."""
        try:
            st = os.stat(self.home.plan_file)
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            sig = None
        changed = False
        if sig != self._plan_sig:
            changed = self._plan_sig is not None and bool(self.refused.held)
            self._plan_sig = sig
            if changed:
                log.info("the plan changed: requests refused before are looked at again")
                self.refused.clear()
                self.quiet.clear()
        if self.refused.prune(time.time()) or changed:
            self.write()

    def write(self) -> None:
        try:
            refusals.write(self.home, self.slot, self.appliance_id, self.refused)
        except OSError as e:
            log.warning("writing %s: %s", refusals.refusals_file(self.home, self.slot), e)

    def refuse(self, src, msg, req: Request, why: str) -> str:
        """No slot here can run this message of a shared queue: "refused" (back for the other
        appliances when the pass ends) or, once the fleet has shown nobody can, dead-lettered."""
        now = time.time()
        key = refusals.message_key(msg.body)
        record = refusals.add(msg.refusals, self.appliance_id, why, now)
        final = refusals.unrunnable(record, self.settings.unrunnable_after_refusals,
                                    self.settings.unrunnable_after_s, now)
        if final:
            log.warning("dead-lettering %s: %s", req.key, final)
            src.dead_letter(msg, f"{final} [class: {classes.USER}]")
            self.refused.forget(key)
            self.write()
            return "settled"
        held = self.refused.refused(key, msg.source, msg.queue, req.key, why, list(record["by"]), now)
        msg.refusals = record
        self.write()
        log.info("refusing %s from %s/%s (no slot here can run it: %s); %d appliance(s) refused it; "
                 "not looking at it again for %.0fs", req.key, msg.source, msg.queue, why,
                 len(record["by"]), held.delay)
        return "refused"

    def give_back(self, src, msg, verdict: str) -> None:
        try:
            if verdict == "refused":
                src.refuse(msg, msg.refusals)
            else:
                src.release(msg, counted=False)
        except Exception:  # noqa: BLE001 - the source logs; the broker hands it out again
            log.exception("giving back %s/%s", msg.queue, msg.message_id)

    def go_quiet(self, src, queue: str, msgs: list) -> None:
        """Every message this pass found in `queue` was refused here: claim from it again when
        the first of their waits ends, or when a message arrives (its depth grows)."""
        now = time.time()
        ends = [h.until for h in (self.refused.held.get(refusals.message_key(m.body)) for m in msgs) if h]
        until = min(ends) if ends else now + self.settings.refusal_backoff_s
        depth = getattr(src, "depth", None)
        try:
            n = depth(queue) if depth else None
        except Exception:  # noqa: BLE001 - unknown depth: quiet until the first wait ends only
            n = None
        if n is None:
            until = min(until, now + QUIET_BLIND_S)
        self.quiet[(getattr(src, "name", ""), queue)] = (until, n)

    def is_quiet(self, src, queue: str) -> bool:
        key = (getattr(src, "name", ""), queue)
        q = self.quiet.get(key)
        if q is None:
            return False
        until, depth = q
        if time.time() >= until:
            del self.quiet[key]
            return False
        if depth is None:
            return True
        try:
            now_depth = src.depth(queue)
        except Exception:  # noqa: BLE001
            now_depth = None
        if now_depth is None or now_depth > depth:
            del self.quiet[key]  # something new (or we cannot tell): look
            return False
        self.quiet[key] = (until, now_depth)  # fewer now: a new arrival shows as growth from here
        return True

    def waiting(self, msg, now: float) -> bool:
        """Refused here a moment ago: give it back untouched."""
        return self.refused.waiting(refusals.message_key(msg.body), now)
