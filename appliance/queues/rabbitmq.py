"""RabbitMQ queues (`rmq_*`), the way StudioML uses them: topic exchange `StudioML.topic`,
routing key `StudioML.<queue>`, one JSON request per message.

Finding queues: the bindings of `StudioML.topic` (management API, like StudioML's Go runner),
keeping destinations named `rmq_*`; plus any queue named in the credentials entry (`queues`),
checked with a passive declare. Without a `management` URL, `http://<amqp host>:15672` is tried
with the AMQP user and password.

Claiming is `basic.get` with manual ack, so a runner holds at most the one message it runs,
and a runner (or a whole appliance) that dies hands its message back to the broker at once:
another appliance consuming the same queue runs it. That is how work spreads over machines.

Long jobs and RabbitMQ's `consumer_timeout` (30 min by default; it also covers `basic.get`
deliveries): a delivery left unacked longer than that gets its channel closed by the broker,
and the message would be redelivered while the job still runs. So a job running longer than
`lease_after` (default 10 min, keep it below the broker's consumer_timeout) switches to a
*lease*: the runner publishes a copy of the message (publisher-confirmed) into a private
holding queue `appliance.lease.<queue>.<id>` whose messages expire after `lease` (default
20 min) and are then dead-lettered back to `<queue>`; only then is the original acked. Every
`lease_after` the lease is renewed (new holding queue, old one deleted). Done: the holding queue
is deleted. Released: the message is republished to `<queue>` and the holding queue deleted.
A runner that dies while holding a lease lets the copy expire, and the message returns to its
queue within `lease`. Runners call `keepalive` every minute, which also keeps AMQP heartbeats
flowing during a job.

Dead letters go to a durable queue `<queue>.dead` with the reason in header
`x-appliance-reason` (not bound to StudioML.topic, so nobody consumes them by accident).

Attempts: header `x-appliance-attempts` counts the claims of a message that are over (absent:
none). A claim is attempt header + 1. A message we hold and never settle (the runner crashed,
was killed, lost its connection) comes back from the broker marked `redelivered`; the next
claim counts that lost claim before anyone works on it: it publishes the copy with header + 1
to the back of the queue, acks the redelivered one, and claims on. So every claim is counted,
durably in the broker, before its work starts. Release, lease and dead-letter copies carry the
count; we never requeue with a nack (that too would mark it redelivered). The channel is
transactional (tx.select): a copy and the ack of the message it replaces are committed together,
so a runner dying between the two leaves neither a lost nor a duplicated message, and the
commit returns only once the broker has stored the copy (like a publisher confirm).

Refusals (several appliances on one queue, see refusals.py): `refuse` is an uncounted release
whose copy also carries header `x-appliance-refused-by` (the refusal record, JSON), published
and acked in the same transaction.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import pika
import pika.exceptions

from appliance.queues import refusals
from appliance.queues.base import Claimed
from appliance.queues.rabbitmq_broker import (  # noqa: F401 - where importers find them
    AMQP_ERRORS, EXCHANGE, QUEUE_PREFIX, RabbitError, RabbitSpec, _vhost, bound_queues, connect, is_rmq_queue,
    management_url, publish, redact)

log = logging.getLogger("appliance.queues.rabbitmq")

ATTEMPTS_HEADER = "x-appliance-attempts"
REDELIVERED_PER_CLAIM = 16  # at most this many returned messages are counted by one claim
REFRESH_S = 2.0  # how often the list of queues is asked for again


@dataclass
class _Held:
    tag: int
    channel: Any
    properties: Any
    exchange: str
    routing_key: str
    got_at: float
    lease_queue: str = ""
    leased_at: float = 0.0
    lost: str = ""  # why the broker took the message back (channel closed), if it did


def counted_claims(props) -> int:
    """Claims of this message already over, from its `x-appliance-attempts` header."""
    value = (props.headers or {}).get(ATTEMPTS_HEADER, 0)
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0  # not ours: count afresh


def check(spec: RabbitSpec) -> list[str]:
    """Connect, list the queues, disconnect: what the controller shows for an entry.
    Raises RabbitError with the reason when the entry cannot be served."""
    conn = connect(spec)
    try:
        source = RabbitSource("check", spec, connection=conn)
        return source.queues(strict=True)
    finally:
        try:
            conn.close()
        except AMQP_ERRORS:
            pass


class RabbitSource:
    """`QueueSource` over one broker (one credentials entry)."""

    def __init__(self, name: str, spec: RabbitSpec, connection: Optional[pika.BlockingConnection] = None):
        self.name = name
        self.spec = spec
        self.conn = connection or connect(spec)
        self.ch = self._channel()
        self._queues: list[str] = []
        self._queues_at = 0.0
        self.problem = ""  # last trouble listing queues (shown in status)
        self._held: dict[str, Claimed] = {}
        self._probe = None  # a channel for passive declares (a missing queue closes it)

    # -- plumbing

    def _channel(self):
        ch = self.conn.channel()
        ch.tx_select()
        return ch

    def _rollback(self) -> None:
        """After a failed step: drop what it left uncommitted, so no later commit applies it."""
        try:
            if self.ch.is_open:
                self.ch.tx_rollback()
        except AMQP_ERRORS:
            pass

    def _alive(self) -> None:
        """Reconnect / reopen what the broker closed."""
        if self.conn is None or not self.conn.is_open:
            log.warning("%s: connection lost; reconnecting to %s", self.name, self.spec.redacted_url())
            self._drop_held("the connection was lost")
            self.conn = connect(self.spec)
            self.ch = self._channel()
        elif not self.ch.is_open:
            self._drop_held("the channel was closed by the broker")
            self.ch = self._channel()

    def _drop_held(self, why: str) -> None:
        for msg in self._held.values():
            h: _Held = msg.handle
            if not h.lease_queue and not h.lost:
                h.lost = why
                log.error("%s: %s while %s/%s ran; the broker put it back on the queue, so it may "
                          "run again elsewhere (if this was RabbitMQ's consumer_timeout, lower "
                          "lease_after below it)", self.name, why, msg.queue, msg.message_id)

    def pump(self) -> None:
        """Let pika send heartbeats and notice a closed connection."""
        try:
            if self.conn.is_open:
                self.conn.process_data_events(0)
        except AMQP_ERRORS as e:
            log.warning("%s: %s", self.name, e)

    # -- QueueSource

    def queues(self, strict: bool = False) -> list[str]:
        now = time.monotonic()
        if not strict and now - self._queues_at < REFRESH_S:
            self.pump()
            return list(self._queues)
        self._queues_at = now
        found: set = set()
        problem = ""
        if self.spec.management or not self.spec.queues:
            try:
                found.update(bound_queues(self.spec))
            except RabbitError as e:
                problem = str(e)
                if strict and not self.spec.queues:
                    raise
        self._alive()
        probe = None  # a missing queue closes the channel it is asked on: not the one holding jobs
        try:
            for q in self.spec.queues:
                if probe is None or not probe.is_open:
                    probe = self.conn.channel()
                try:
                    probe.queue_declare(q, passive=True)
                    found.add(q)
                except pika.exceptions.ChannelClosedByBroker:
                    problem = problem or f"queue {q} does not exist"
        finally:
            if probe is not None and probe.is_open:
                probe.close()
        self.problem = problem
        self._queues = sorted(found)
        return list(self._queues)

    def claim(self, queue: str) -> Optional[Claimed]:
        self._alive()
        for _ in range(REDELIVERED_PER_CLAIM):
            try:
                method, props, body = self.ch.basic_get(queue, auto_ack=False)
            except pika.exceptions.ChannelClosedByBroker as e:
                self._drop_held("the channel was closed by the broker")
                self.ch = self._channel()
                if e.reply_code == 404:
                    self._queues_at = 0.0
                    return None
                raise
            if method is None:
                return None
            msg_id = props.message_id or f"{queue}.{uuid.uuid4().hex[:12]}"
            if method.redelivered:
                self._count_lost_claim(queue, method, props, body, msg_id)
                continue
            held = _Held(method.delivery_tag, self.ch, props, method.exchange, method.routing_key,
                         time.monotonic())
            msg = Claimed(source=self.name, queue=queue, message_id=msg_id, body=body, handle=held,
                          attempt=counted_claims(props) + 1, shared=True,
                          refusals=refusals.parse((props.headers or {}).get(refusals.HEADER)))
            self._held[msg_id] = msg
            return msg
        return None

    def _count_lost_claim(self, queue: str, method, props, body: bytes, msg_id: str) -> None:
        """`method` was handed out before and never settled: count that claim (see the module
        doc) by replacing the message with a copy whose header says so, at the back of the queue."""
        over = counted_claims(props) + 1
        log.warning("%s: %s/%s came back unsettled from the runner that held it (it died or lost "
                    "its connection); %d claim(s) of it are over", self.name, queue, msg_id, over)
        try:
            self.ch.basic_publish("", queue, body, self._persistent(props, {ATTEMPTS_HEADER: over}, msg_id))
            self.ch.basic_ack(method.delivery_tag)
            self.ch.tx_commit()
        except AMQP_ERRORS:
            self._rollback()
            raise

    def keepalive(self, msg: Claimed) -> None:
        self.pump()
        h: _Held = msg.handle
        if h.lost:
            return
        now = time.monotonic()
        if not h.lease_queue and now - h.got_at >= self.spec.lease_after_s:
            self._lease(msg)
        elif h.lease_queue and now - h.leased_at >= self.spec.lease_after_s:
            self._lease(msg)

    def _lease(self, msg: Claimed) -> None:
        """Move the message into a fresh holding queue that gives it back when it expires."""
        h: _Held = msg.handle
        try:
            self._alive()
        except (RabbitError, *AMQP_ERRORS) as e:
            log.warning("%s: cannot renew the lease of %s now: %s", self.name, msg.message_id, e)
            return
        if not h.lease_queue and h.channel is not self.ch:
            return  # its channel is gone: the broker already took it back (logged)
        name = f"appliance.lease.{msg.queue}.{uuid.uuid4().hex[:12]}"
        ttl = int(self.spec.lease_s * 1000)
        try:
            self.ch.queue_declare(name, durable=True, arguments={
                "x-message-ttl": ttl, "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": msg.queue, "x-expires": 2 * ttl + 60_000})
            # if we die holding the lease, the copy comes back with this claim counted
            self.ch.basic_publish("", name, msg.body, self._persistent(
                h.properties, {ATTEMPTS_HEADER: msg.attempt}, msg.message_id))
            if not h.lease_queue:
                h.channel.basic_ack(h.tag)
            self.ch.tx_commit()
            if h.lease_queue:
                self.ch.queue_delete(h.lease_queue)
        except AMQP_ERRORS as e:
            self._rollback()
            log.warning("%s: lease of %s/%s failed (%s); will retry", self.name, msg.queue,
                        msg.message_id, e)
            return
        log.info("%s: %s/%s now held by lease %s (%ss)", self.name, msg.queue, msg.message_id,
                 name, self.spec.lease_s)
        h.lease_queue, h.leased_at = name, time.monotonic()

    @staticmethod
    def _persistent(props, headers: Optional[dict] = None, message_id: Optional[str] = None):
        p = pika.BasicProperties(
            content_type=props.content_type or "application/json", delivery_mode=2,
            message_id=message_id or props.message_id, headers={**(props.headers or {}), **(headers or {})},
            correlation_id=props.correlation_id, timestamp=props.timestamp)
        return p

    def _settle(self, msg: Claimed, republish_to: str = "", headers=None) -> None:
        """Done with the message we hold (or its lease): publish a copy to `republish_to` (if
        given) and ack ours in one transaction."""
        h: _Held = msg.handle
        self._held.pop(msg.message_id, None)
        if not h.lease_queue and not h.lost and not (h.channel is self.ch and self.ch.is_open):
            h.lost = "its channel or connection was closed"
        if h.lost:
            log.warning("%s: %s/%s was already put back by the broker (%s)", self.name,
                        msg.queue, msg.message_id, h.lost)
            return
        try:
            self._alive()  # a leased message needs a connection, not the one it came on
            if republish_to:
                if republish_to != msg.queue:
                    self.ch.queue_declare(republish_to, durable=True)
                self.ch.basic_publish("", republish_to, msg.body,
                                      self._persistent(h.properties, headers, msg.message_id))
            if not h.lease_queue:
                h.channel.basic_ack(h.tag)
            self.ch.tx_commit()
            if h.lease_queue:
                self.ch.queue_delete(h.lease_queue)
        except (RabbitError, *AMQP_ERRORS) as e:
            self._rollback()
            log.error("%s: settling %s/%s failed (%s); the broker will hand it out again",
                      self.name, msg.queue, msg.message_id, e)

    def ack(self, msg: Claimed) -> None:
        self._settle(msg)

    def release(self, msg: Claimed, counted: bool = True) -> None:
        """Back to the end of its queue (a nack would mark it redelivered, i.e. lost by a dead
        runner), carrying this claim in its count unless `counted=False`."""
        over = msg.attempt if counted else msg.attempt - 1
        self._settle(msg, republish_to=msg.queue, headers={ATTEMPTS_HEADER: over})

    def dead_letter(self, msg: Claimed, reason: str) -> None:
        self._settle(msg, republish_to=f"{msg.queue}.dead",
                     headers={"x-appliance-reason": reason[:4000], ATTEMPTS_HEADER: msg.attempt})

    def refuse(self, msg: Claimed, record: dict) -> None:
        """Back to the end of its queue for other appliances: uncounted, with the refusal record."""
        self._settle(msg, republish_to=msg.queue,
                     headers={ATTEMPTS_HEADER: msg.attempt - 1, refusals.HEADER: refusals.dump(record)})

    def depth(self, queue: str) -> Optional[int]:
        """Messages ready in `queue` (passive declare on a channel of its own); None if unknown."""
        try:
            self._alive()
            if self._probe is None or not self._probe.is_open:
                self._probe = self.conn.channel()
            return self._probe.queue_declare(queue, passive=True).method.message_count
        except (RabbitError, *AMQP_ERRORS):
            return None

    @property
    def holding(self) -> int:
        return len(self._held)

    def close(self) -> None:
        for msg in list(self._held.values()):
            self.release(msg)
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except AMQP_ERRORS:
            pass
        self.conn = None

