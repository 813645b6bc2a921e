"""The one interface every queue source (local directory, RabbitMQ, SQS) offers a runner.

A runner claims a message, works on it, then settles it exactly once: `ack` (done, remove),
`release` (put back for another try, e.g. the store was down), or `dead_letter` (never
runnable: malformed, impossible resources, failed for good), with the reason kept.
While a job runs the runner calls `keepalive` now and then so the source does not hand the
message to someone else (SQS visibility, RabbitMQ consumer timeout).
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

    def release(self, msg: Claimed) -> None:
        """Put the message back so it runs again (here or elsewhere)."""

    def dead_letter(self, msg: Claimed, reason: str) -> None:
        """Never run this message again; keep it with `reason` where a human can see it."""

    def close(self) -> None:
        """Release connections; unsettled messages go back to the queue."""
