"""Requests this appliance cannot run, on queues it shares with other appliances.

In a fleet (several appliances on one RabbitMQ or SQS queue, boxes of different shapes) a
request that no slot of this box can ever run may suit another box: this one *refuses* it
instead of dead-lettering it. The message goes back to its queue, uncounted (not an attempt),
carrying a refusal record, and this runner does not take it again for a while (per message:
30 s, doubling up to 10 min), so a queue holding only such messages lets it idle.

The record travels with the message (RabbitMQ header `x-appliance-refused-by`, SQS message
attribute `appliance-refused-by`), as JSON:

    {"first": <epoch of the first refusal>, "by": {"<appliance id>": "<why not>", ...}}

Each appliance is counted once however often it refuses. The request is dead-lettered, with
the refusals as its reason, once `queues.unrunnable_after_refusals` distinct appliances refused
it, or it has been refused for `queues.unrunnable_after` since the first refusal. The local
queue serves one box only: there, such a request is dead-lettered at once.

Each runner writes what it refused and holds back to HOME/status/refusals/<slot>.json
(atomically), which `appliance queue ls` reads.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from appliance.files import write_atomic
from appliance.sha256 import sha256

HEADER = "x-appliance-refused-by"  # RabbitMQ
ATTRIBUTE = "appliance-refused-by"  # SQS
BACKOFF_S = 30.0
BACKOFF_MAX_S = 600.0
MAX_REFUSERS = 64  # a record names at most this many appliances (the header stays small)
REASON_CHARS = 300


def parse(value) -> dict:
    """A refusal record from a header or attribute value; {} when absent or not ours."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode(errors="replace")
    if not isinstance(value, str) or not value:
        return {}
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    by = data.get("by") if isinstance(data, dict) else None
    if not isinstance(by, dict):
        return {}
    try:
        first = float(data.get("first"))
    except (TypeError, ValueError):
        first = time.time()
    return {"first": first, "by": {str(k): str(v) for k, v in by.items()}}


def dump(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def add(record: dict, appliance: str, reason: str, now: float) -> dict:
    """`record` with `appliance`'s refusal in it (a new dict; one entry per appliance)."""
    by = dict(record.get("by") or {})
    by.pop(appliance, None)
    by[appliance] = reason[:REASON_CHARS]
    while len(by) > MAX_REFUSERS:
        by.pop(next(iter(by)))
    return {"first": float(record.get("first") or now), "by": by}


def unrunnable(record: dict, after_refusals: int, after_s: float, now: float) -> Optional[str]:
    """The dead-letter reason when the fleet has shown nobody can run it, else None."""
    by = record.get("by") or {}
    named = "; ".join(f"{who}: {why}" for who, why in by.items())
    if len(by) >= after_refusals:
        return (f"no appliance serving this queue can run it: {len(by)} appliance(s) refused it "
                f"({named}) (queues.unrunnable_after_refusals = {after_refusals})")
    age = now - float(record.get("first") or now)
    if after_s and age >= after_s:
        return (f"no appliance serving this queue ran it in {age:.0f}s since it was first refused "
                f"(queues.unrunnable_after = {after_s:.0f}s); refused by {named}")
    return None


def message_key(body: bytes) -> str:
    """The same for every copy of a message (copies get new ids on SQS)."""
    return sha256(body).hexdigest()[:20]


@dataclass
class Held:
    """A message this runner refused and does not take again before `until`."""

    source: str
    queue: str
    experiment: str
    reason: str
    until: float
    delay: float
    refused_by: list = field(default_factory=list)
    seen: float = 0.0


class Backoff:
    """What this runner refused, per message, and until when it leaves each alone."""

    def __init__(self, first_s: float = BACKOFF_S, max_s: float = BACKOFF_MAX_S):
        self.first_s, self.max_s = first_s, max_s
        self.held: dict[str, Held] = {}

    def waiting(self, key: str, now: float) -> bool:
        h = self.held.get(key)
        return h is not None and h.until > now

    def refused(self, key: str, source: str, queue: str, experiment: str, reason: str,
                refused_by: list, now: float) -> Held:
        old = self.held.get(key)
        delay = self.first_s if old is None else min(old.delay * 2, self.max_s)
        h = Held(source, queue, experiment, reason, now + delay, delay, list(refused_by), now)
        self.held[key] = h
        return h

    def forget(self, key: str) -> None:
        self.held.pop(key, None)

    def clear(self) -> None:
        self.held.clear()

    def prune(self, now: float) -> bool:
        """Drop messages not seen again long after their wait ended (another box ran them);
        True if anything went."""
        gone = [k for k, h in self.held.items() if current(h.until, h.delay, now) is False]
        for k in gone:
            del self.held[k]
        return bool(gone)


def current(until: float, delay: float, now: float) -> bool:
    """Is a refusal still news? Until its wait ended and as long again (at least a minute)."""
    return now < until + max(delay, 60.0)


def refusals_file(home, slot: str) -> Path:
    return Path(home.refusals_dir) / f"{slot}.json"


def write(home, slot: str, appliance: str, backoff: Backoff) -> None:
    data = {"slot": slot, "appliance": appliance, "updated": time.time(),
            "messages": {k: h.__dict__ for k, h in backoff.held.items()}}
    write_atomic(refusals_file(home, slot), json.dumps(data, indent=1, sort_keys=True) + "\n", mode=0o644)


def read_all(home, now: Optional[float] = None) -> dict:
    """(source, queue) -> {message key: its latest Held as a dict}, over every slot's file,
    refusals that are no longer news left out."""
    now = time.time() if now is None else now
    out: dict = {}
    folder = Path(home.refusals_dir)
    try:
        names = sorted(os.listdir(folder))
    except (FileNotFoundError, PermissionError):  # a member: HOME/status is the appliance's alone
        return {}
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            data = json.loads((folder / name).read_text())
            messages = data["messages"].items()
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        for key, h in messages:
            try:
                if not current(float(h["until"]), float(h["delay"]), now):
                    continue
                per_queue = out.setdefault((h["source"], h["queue"]), {})
            except (KeyError, TypeError, ValueError):
                continue
            if key not in per_queue or per_queue[key].get("seen", 0) < h.get("seen", 0):
                per_queue[key] = h
    return out
