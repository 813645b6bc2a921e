"""The one interface every queue source (local directory, RabbitMQ, SQS) offers a runner.

A runner claims a message, works on it, then settles it exactly once: `ack` (done, remove),
`release` (put back for another try, e.g. the store was down), or `dead_letter` (never
runnable: malformed, impossible resources, failed for good), with the reason kept.
While a job runs the runner calls `keepalive` now and then so the source does not hand the
message to someone else (SQS visibility, RabbitMQ consumer timeout).

Every claim counts as an attempt, and the count travels with the message, recorded at claim
time before any work starts: a message that crashes or kills its runner, or outlives it, is
counted too, so no message can loop for ever. `Claimed.attempt` is which attempt this claim is
(1 for the first). `release` keeps the count (the next claim is attempt + 1); `release(msg,
counted=False)` gives this claim back uncounted, for a message the runner only looked at and
never started (held back for another slot). `ack` and `dead_letter` forget it.

Queues several appliances share (RabbitMQ, SQS: `Claimed.shared`) also carry a refusal record
(`Claimed.refusals`, see refusals.py): `refuse` puts a message no slot of this appliance can
run back for the others, uncounted, with the record this appliance added itself to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol


@dataclass
class Claimed:
    """A message this runner holds. `handle` is the source's own token (path, delivery tag...)."""

    source: str  # name of the QueueSource that produced it
    queue: str  # queue name, e.g. "local_test" or "rmq_gpu"
    message_id: str
    body: bytes
    handle: Any = field(default=None, repr=False)
    attempt: int = 1  # which claim of this message this is, 1 for the first (see the module doc)
    shared: bool = False  # other appliances may serve this queue too (RabbitMQ, SQS)
    refusals: dict = field(default_factory=dict)  # the refusal record it came with (refusals.py)
    owner_uid: Optional[int] = None  # who submitted it, as the kernel says (a local file's uid); None: unknown


def over_attempts(msg: Claimed, max_attempts: int) -> Optional[str]:
    """The dead-letter reason if `msg` was claimed more than `max_attempts` times, else None."""
    if msg.attempt <= max_attempts:
        return None
    return (f"claimed {msg.attempt - 1} times without finishing (the limit is runner.max_attempts = "
            f"{max_attempts}): it crashed or outlived its runner each time")


class QueueSource(Protocol):
    name: str

    def queues(self) -> list[str]:
        """Names of the queues this source currently serves."""

    def claim(self, queue: str) -> Optional[Claimed]:
        """Take one message off `queue` without blocking; None if there is none."""

    def keepalive(self, msg: Claimed) -> None:
        """Keep `msg` ours while it runs."""

    def ack(self, msg: Claimed) -> None:
        """The message is done; remove it for good."""

    def release(self, msg: Claimed, counted: bool = True) -> None:
        """Put the message back so it runs again (here or elsewhere). `counted=False`: this
        claim never started the work, so it does not count as an attempt."""

    def dead_letter(self, msg: Claimed, reason: str) -> None:
        """Never run this message again; keep it with `reason` where a human can see it."""

    def refuse(self, msg: Claimed, refusals: dict) -> None:
        """No slot of this appliance can run it: back to its queue for other appliances,
        uncounted, now carrying the refusal record `refusals`."""

    def depth(self, queue: str) -> Optional[int]:
        """How many messages wait in `queue` (None: cannot tell). Lets a runner that holds
        back every message there notice a new one without claiming."""

    def close(self) -> None:
        """Release connections; unsettled messages go back to the queue."""
