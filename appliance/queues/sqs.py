"""SQS queues (`sqs_*`) from one credentials folder, StudioML Go runner style.

The folder holds an AWS `credentials` file and a `config` file (the same INI files `aws
configure` writes). The `default` profile is used (or the only one there is). The `config`
profile's `region` is required; `endpoint_url` in it points at a local SQS-compatible server
(ElasticMQ, moto, LocalStack) instead of AWS. Queues served: every queue of that account whose
name starts with `sqs_` (ListQueues with that prefix), refreshed every few seconds, plus any
named in the config profile as `queues = sqs_a sqs_b`.

A claimed message is invisible to others for `visibility` seconds (180 s; runners extend it
every minute); while its job runs,
`keepalive` extends it (ChangeMessageVisibility) so it never reappears mid-run; a runner that
dies stops extending it and the message comes back within that time. Release sets the
visibility to 0 (back at once). Dead letters go to `<queue>_dead` (created when needed) with
the reason as a message attribute.

Attempts: SQS itself counts every receive of a message (`ApproximateReceiveCount`), a runner
that died with it included, so a claim is attempt = that count + the message attribute
`appliance-attempts` (claims counted before this copy of the message was sent; absent: 0).
An uncounted release (`counted=False`) cannot lower SQS's count, so it sends a copy carrying
the count so far and deletes the one received (in that order: at worst a duplicate, never a
loss; standard SQS queues may deliver twice anyway).

Refusals (several appliances on one queue, see refusals.py): `refuse` sends such an uncounted
copy that also carries the message attribute `appliance-refused-by` (the refusal record, JSON).
"""

from __future__ import annotations

import configparser
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from appliance.queues import refusals
from appliance.queues.base import Claimed

log = logging.getLogger("appliance.queues.sqs")

QUEUE_PREFIX = "sqs_"
REFRESH_S = 5.0
VISIBILITY_S = 180
ATTEMPTS_ATTRIBUTE = "appliance-attempts"


class SqsError(RuntimeError):
    pass


@dataclass(frozen=True)
class SqsSpec:
    access_key: str
    secret_key: str
    region: str
    session_token: str = ""
    endpoint_url: str = ""
    queues: tuple = ()
    visibility_s: int = VISIBILITY_S


def _profile(parser: configparser.ConfigParser, names: tuple, what: str, path: Path):
    for name in names:
        if parser.has_section(name):
            return parser[name]
    sections = parser.sections()
    if len(sections) == 1:
        return parser[sections[0]]
    raise ValueError(f"{path}: no [default] profile in the {what} file"
                     + (f" (found {', '.join(sections)})" if sections else " (is it still being written?)"))


def parse_sqs_dir(folder: Path) -> SqsSpec:
    creds_path, config_path = folder / "credentials", folder / "config"
    for p in (creds_path, config_path):
        if not p.is_file():
            raise ValueError(f"missing {p.name} file (an SQS entry is a folder with an AWS "
                             "`credentials` and `config` pair)")
    creds = configparser.ConfigParser()
    creds.read_string(creds_path.read_text(), str(creds_path))
    config = configparser.ConfigParser()
    config.read_string(config_path.read_text(), str(config_path))
    c = _profile(creds, ("default",), "credentials", creds_path)
    k = _profile(config, ("default", "profile default"), "config", config_path)
    access, secret = c.get("aws_access_key_id", "").strip(), c.get("aws_secret_access_key", "").strip()
    if not access or not secret:
        raise ValueError(f"{creds_path}: needs aws_access_key_id and aws_secret_access_key")
    region = k.get("region", "").strip()
    if not region:
        raise ValueError(f"{config_path}: needs region (e.g. region = us-east-1)")
    endpoint = (k.get("endpoint_url", "") or k.get("sqs_endpoint_url", "")).strip()
    queues = tuple(q for q in k.get("queues", "").replace(",", " ").split() if q)
    return SqsSpec(access, secret, region, c.get("aws_session_token", "").strip(), endpoint, queues)


def _attempt(m: dict) -> int:
    """Which claim of message `m` (a receive_message entry) this is."""
    try:
        received = int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1))
    except ValueError:
        received = 1
    try:
        before = int(m.get("MessageAttributes", {}).get(ATTEMPTS_ATTRIBUTE, {}).get("StringValue", 0))
    except ValueError:
        before = 0
    return max(0, before) + max(1, received)


def _client(spec: SqsSpec):
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client(
        "sqs", region_name=spec.region, endpoint_url=spec.endpoint_url or None,
        aws_access_key_id=spec.access_key, aws_secret_access_key=spec.secret_key,
        aws_session_token=spec.session_token or None,
        config=BotoConfig(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2}))


def _explain(e: Exception, spec: SqsSpec) -> str:
    where = spec.endpoint_url or f"AWS SQS {spec.region}"
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "") if hasattr(e, "response") else ""
    if code in ("InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException",
                "AccessDenied", "AccessDeniedException"):
        return f"{where} refused the credentials ({code})"
    return f"{where}: {type(e).__name__}: {e}"


def check(spec: SqsSpec) -> list[str]:
    try:
        return SqsSource("check", spec).queues()
    except SqsError:
        raise
    except Exception as e:  # noqa: BLE001 - botocore's errors, shown as the entry's reason
        raise SqsError(_explain(e, spec)) from None


class SqsSource:
    def __init__(self, name: str, spec: SqsSpec):
        self.name = name
        self.spec = spec
        self.client = _client(spec)
        self._urls: dict[str, str] = {}
        self._at = 0.0
        self._held: dict[str, Claimed] = {}
        self._extended: dict[str, float] = {}
        self._attributes: dict[str, dict] = {}  # message id -> its message attributes (for copies)
        self.queues()  # fail now (bad credentials, no endpoint) rather than on first claim

    def queues(self) -> list[str]:
        now = time.monotonic()
        if self._at and now - self._at < REFRESH_S:
            return sorted(self._urls)
        try:
            urls = self.client.list_queues(QueueNamePrefix=QUEUE_PREFIX).get("QueueUrls", [])
            found = {u.rstrip("/").rsplit("/", 1)[-1]: u for u in urls}
            for q in self.spec.queues:
                if q not in found:
                    try:
                        found[q] = self.client.get_queue_url(QueueName=q)["QueueUrl"]
                    except Exception:  # noqa: BLE001 - a named queue that does not exist yet
                        pass
        except Exception as e:  # noqa: BLE001
            raise SqsError(_explain(e, self.spec)) from None
        self._urls = {k: v for k, v in found.items() if not k.endswith("_dead")}
        self._at = now
        return sorted(self._urls)

    def claim(self, queue: str) -> Optional[Claimed]:
        url = self._urls.get(queue)
        if url is None:
            return None
        resp = self.client.receive_message(QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=0,
                                           VisibilityTimeout=self.spec.visibility_s,
                                           AttributeNames=["All"], MessageAttributeNames=["All"])
        msgs = resp.get("Messages", [])
        if not msgs:
            return None
        m = msgs[0]
        record = m.get("MessageAttributes", {}).get(refusals.ATTRIBUTE, {}).get("StringValue")
        msg = Claimed(source=self.name, queue=queue, message_id=m["MessageId"],
                      body=m["Body"].encode(), handle=(url, m["ReceiptHandle"]), attempt=_attempt(m),
                      shared=True, refusals=refusals.parse(record))
        self._attributes[m["MessageId"]] = m.get("MessageAttributes", {})
        self._held[m["MessageId"]] = msg
        self._extended[m["MessageId"]] = time.monotonic()
        return msg

    def keepalive(self, msg: Claimed) -> None:
        url, receipt = msg.handle
        self.client.change_message_visibility(QueueUrl=url, ReceiptHandle=receipt,
                                              VisibilityTimeout=self.spec.visibility_s)
        self._extended[msg.message_id] = time.monotonic()

    def ack(self, msg: Claimed) -> None:
        url, receipt = msg.handle
        self._held.pop(msg.message_id, None)
        self._attributes.pop(msg.message_id, None)
        self.client.delete_message(QueueUrl=url, ReceiptHandle=receipt)

    def release(self, msg: Claimed, counted: bool = True) -> None:
        url, receipt = msg.handle
        if not counted:
            try:
                self._send_uncounted_copy(msg)
            except Exception as e:  # noqa: BLE001 - then it counts: still back when its visibility ends
                log.warning("%s: releasing %s uncounted: %s; it counts as a claim", self.name,
                            msg.message_id, e)
            else:
                self.ack(msg)
                return
        self._held.pop(msg.message_id, None)
        self._attributes.pop(msg.message_id, None)
        try:
            self.client.change_message_visibility(QueueUrl=url, ReceiptHandle=receipt, VisibilityTimeout=0)
        except Exception as e:  # noqa: BLE001 - it comes back when its visibility ends anyway
            log.warning("%s: releasing %s: %s", self.name, msg.message_id, e)

    def refuse(self, msg: Claimed, record: dict) -> None:
        """An uncounted copy carrying the refusal record replaces the message (see the module doc)."""
        try:
            self._send_uncounted_copy(msg, {refusals.ATTRIBUTE: {"DataType": "String",
                                                                 "StringValue": refusals.dump(record)}})
        except Exception as e:  # noqa: BLE001 - then it comes back as it was, counted
            log.warning("%s: refusing %s: %s; it goes back as it came", self.name, msg.message_id, e)
            self.release(msg)
            return
        self.ack(msg)

    def depth(self, queue: str) -> Optional[int]:
        url = self._urls.get(queue)
        if url is None:
            return None
        try:
            got = self.client.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
            return int(got["Attributes"]["ApproximateNumberOfMessages"])
        except Exception:  # noqa: BLE001 - unknown: the runner claims to find out
            return None

    def _send_uncounted_copy(self, msg: Claimed, extra: Optional[dict] = None) -> None:
        url, _receipt = msg.handle
        attributes = {k: {f: v[f] for f in ("DataType", "StringValue", "BinaryValue") if f in v}
                      for k, v in self._attributes.get(msg.message_id, {}).items()}
        attributes[ATTEMPTS_ATTRIBUTE] = {"DataType": "Number", "StringValue": str(msg.attempt - 1)}
        attributes.update(extra or {})
        self.client.send_message(QueueUrl=url, MessageBody=msg.body.decode(errors="replace"),
                                 MessageAttributes=attributes)

    def dead_letter(self, msg: Claimed, reason: str) -> None:
        url, receipt = msg.handle
        dead = self.client.create_queue(QueueName=f"{msg.queue}_dead")["QueueUrl"]
        self.client.send_message(QueueUrl=dead, MessageBody=msg.body.decode(errors="replace"),
                                 MessageAttributes={"reason": {"DataType": "String",
                                                               "StringValue": reason[:4000] or "-"}})
        self.ack(msg)

    @property
    def holding(self) -> int:
        return len(self._held)

    def close(self) -> None:
        for msg in list(self._held.values()):
            self.release(msg)
