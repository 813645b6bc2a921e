"""RabbitMQ as StudioML uses it, apart from serving its queues (`rabbitmq.py`): an entry's spec,
its URLs (credentials never shown), connecting, finding the `rmq_*` queues bound to
`StudioML.topic` through the management API, and publishing as the client does.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

import pika
import pika.exceptions

EXCHANGE = "StudioML.topic"
QUEUE_PREFIX = "rmq_"
AMQP_ERRORS = (pika.exceptions.AMQPError, OSError)


class RabbitError(RuntimeError):
    """The entry cannot be served; the message says why (shown in `appliance status`)."""


@dataclass(frozen=True)
class RabbitSpec:
    url: str
    management: str = ""
    queues: tuple = ()
    lease_after_s: float = 600.0
    lease_s: float = 1200.0
    heartbeat_s: int = 600

    def redacted_url(self) -> str:
        return redact(self.url)


def redact(url: str) -> str:
    p = urllib.parse.urlsplit(url)
    if p.password is None:
        return url
    netloc = f"{p.username}:***@{p.hostname}" + (f":{p.port}" if p.port else "")
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))


def is_rmq_queue(name: str) -> bool:
    return name.startswith(QUEUE_PREFIX)


def _vhost(url: str) -> str:
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def management_url(spec: RabbitSpec) -> tuple[str, str, str]:
    """(base URL without credentials, user, password) of the management API."""
    amqp = urllib.parse.urlsplit(spec.url)
    if spec.management:
        m = urllib.parse.urlsplit(spec.management)
        user = urllib.parse.unquote(m.username) if m.username else urllib.parse.unquote(amqp.username or "guest")
        password = urllib.parse.unquote(m.password if m.password is not None else (amqp.password or "guest"))
        netloc = m.hostname + (f":{m.port}" if m.port else "")
        base = urllib.parse.urlunsplit((m.scheme, netloc, m.path.rstrip("/"), "", ""))
    else:
        user = urllib.parse.unquote(amqp.username or "guest")
        password = urllib.parse.unquote(amqp.password or "guest")
        base = f"http://{amqp.hostname or 'localhost'}:15672"
    return base, user, password


def bound_queues(spec: RabbitSpec, timeout: float = 3.0) -> list[str]:
    """Queues bound to StudioML.topic (management API); [] if the exchange does not exist yet."""
    base, user, password = management_url(spec)
    vhost = urllib.parse.quote(_vhost(spec.url), safe="")
    url = f"{base}/api/exchanges/{vhost}/{urllib.parse.quote(EXCHANGE)}/bindings/source"
    req = urllib.request.Request(url, headers={
        "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            bindings = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return []  # no StudioML client has declared the exchange yet
        if e.code == 401:
            raise RabbitError(f"management API {base} refused user {user!r} (401): check the password") from None
        raise RabbitError(f"management API {base}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise RabbitError(f"management API {base} not reachable ({reason}); set `management` in the "
                          "entry, or list the queues with `queues = [...]`") from None
    return sorted({b["destination"] for b in bindings
                   if b.get("destination_type") == "queue" and is_rmq_queue(b.get("destination", ""))})


def connect(spec: RabbitSpec, timeout: float = 5.0) -> pika.BlockingConnection:
    try:
        params = pika.URLParameters(spec.url)
    except Exception as e:  # noqa: BLE001 - pika raises various types for bad URLs
        raise RabbitError(f"bad AMQP URL {spec.redacted_url()}: {e}") from None
    if "heartbeat" not in spec.url:
        params.heartbeat = spec.heartbeat_s
    params.socket_timeout = timeout
    params.stack_timeout = timeout + 5
    params.blocked_connection_timeout = 60
    params.connection_attempts = 1
    try:
        return pika.BlockingConnection(params)
    except pika.exceptions.ProbableAuthenticationError:
        raise RabbitError(f"{spec.redacted_url()}: login refused (wrong user or password)") from None
    except pika.exceptions.ProbableAccessDeniedError:
        raise RabbitError(f"{spec.redacted_url()}: access to the virtual host refused") from None
    except AMQP_ERRORS as e:
        raise RabbitError(f"{spec.redacted_url()}: cannot connect ({type(e).__name__}: {e or 'no answer'})") from None


def publish(url: str, queue: str, body: bytes, persistent: bool = True) -> None:
    """Put a request on `queue` as the StudioML client does (tests, `bench/`)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        try:  # use the exchange as whoever made it declared it (a declare must match exactly)
            ch.exchange_declare(EXCHANGE, exchange_type="topic", passive=True)
        except pika.exceptions.ChannelClosedByBroker:  # 404: nobody has; make it as StudioML does
            ch = conn.channel()
            ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True, auto_delete=True)
        ch.queue_declare(queue, durable=persistent)
        ch.queue_bind(queue, EXCHANGE, routing_key=f"StudioML.{queue}")
        ch.confirm_delivery()
        ch.basic_publish(EXCHANGE, f"StudioML.{queue}", body, pika.BasicProperties(
            content_type="application/json", delivery_mode=2 if persistent else 1,
            message_id=str(uuid.uuid4())))
    finally:
        conn.close()
