"""How many messages wait, run and lie dead in each queue, from whichever source: the local
directory queue, and every RabbitMQ and SQS entry of the credentials directory (asked live:
the broker's management API, SQS's queue attributes). Used by /metrics, `queue ls`, `status`
and `top`."""

from __future__ import annotations

import base64
import json
import logging
import urllib.parse
import urllib.request

log = logging.getLogger("appliance.queues.depths")


def local_depths(home) -> list[tuple[str, str, str, int]]:
    from appliance.queues.local import LocalQueueSource

    local = LocalQueueSource(home.queue_root, watch=False)
    rows = []
    for state, counts in (("waiting", local.depths()), ("running", local.claimed_counts()),
                          ("dead", local.dead_counts())):
        rows += [(local.name, q, state, n) for q, n in counts.items()]
    return rows


def rabbit_depths(name: str, spec, timeout: float = 3.0) -> list[tuple[str, str, str, int]]:
    """Per `rmq_*` queue: ready (waiting), unacked plus leased (running), `<queue>.dead` (dead),
    from one call to the management API."""
    from appliance.queues.rabbitmq import _vhost, is_rmq_queue, management_url

    base, user, password = management_url(spec)
    vhost = urllib.parse.quote(_vhost(spec.url), safe="")
    req = urllib.request.Request(
        f"{base}/api/queues/{vhost}?columns=name,messages,messages_ready,messages_unacknowledged",
        headers={"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        queues = json.loads(resp.read())
    counts: dict[tuple[str, str], int] = {}

    def add(queue: str, state: str, n) -> None:
        counts[(queue, state)] = counts.get((queue, state), 0) + int(n or 0)

    for q in queues:
        qname = str(q.get("name", ""))
        if qname.startswith("appliance.lease."):
            add(qname[len("appliance.lease."):].rpartition(".")[0], "running", q.get("messages"))
        elif qname.endswith(".dead") and is_rmq_queue(qname[:-len(".dead")]):
            add(qname[:-len(".dead")], "dead", q.get("messages"))
        elif is_rmq_queue(qname):
            add(qname, "waiting", q.get("messages_ready"))
            add(qname, "running", q.get("messages_unacknowledged"))
    return [(name, q, state, n) for (q, state), n in sorted(counts.items())]


def sqs_depths(name: str, spec) -> list[tuple[str, str, str, int]]:
    from appliance.queues.sqs import QUEUE_PREFIX, _client

    client = _client(spec)
    rows = []
    for url in client.list_queues(QueueNamePrefix=QUEUE_PREFIX).get("QueueUrls", []):
        qname = url.rstrip("/").rsplit("/", 1)[-1]
        attrs = client.get_queue_attributes(QueueUrl=url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        if qname.endswith("_dead"):
            rows.append((name, qname[:-len("_dead")], "dead", int(attrs["ApproximateNumberOfMessages"])))
        else:
            rows.append((name, qname, "waiting", int(attrs["ApproximateNumberOfMessages"])))
            rows.append((name, qname, "running", int(attrs["ApproximateNumberOfMessagesNotVisible"])))
    return rows


def sample_depths(home, config) -> tuple[list, dict]:
    """([(source, queue, state, n)], {source: 1 if its depths were read else 0}) for the local
    queue and every RabbitMQ and SQS entry of the credentials directory, as it is now."""
    rows: list = []
    sampled: dict = {}
    try:
        rows += local_depths(home)
        sampled["local"] = 1
    except OSError as e:
        log.debug("local queue depths: %s", e)
        sampled["local"] = 0
    from appliance.queues import sources as qsources

    for entry in qsources.read_entries(qsources.credentials_dir(home, config)):
        if entry.error:
            continue
        try:
            got = (rabbit_depths(entry.source_name, entry.spec) if entry.kind == "rabbitmq" else
                   sqs_depths(entry.source_name, entry.spec) if entry.kind == "sqs" else [])
            rows += got
            sampled[entry.source_name] = 1
        except Exception as e:  # noqa: BLE001 - its health is in sources.json; depth unknown
            log.debug("queue depths of %s: %s", entry.source_name, e)
            sampled[entry.source_name] = 0
    return rows, sampled


def local_queue(home):
    """The local queue, its expired dead letters gone (when we may delete them)."""
    from appliance.config import load_config
    from appliance.queues.local import LocalQueueSource

    local = LocalQueueSource(home.queue_root, watch=False,
                             dead_ttl_s=load_config(home.config_file).queues.dead_ttl)
    try:
        local.sweep_dead()
    except PermissionError:
        pass  # not a member of the appliance group: the runners sweep
    return local


def queue_table(home) -> list:
    """One row per queue: source, queue, waiting, running, dead (None: not known here), and
    `refused`: requests waiting there that no slot of this box can run, with `cannot_run` why."""
    local = local_queue(home)
    waiting, running, dead = local.depths(), local.claimed_counts(), local.dead_counts()
    names = sorted(set(waiting) | set(running) | set(dead))
    rows = [{"source": local.name, "queue": q, "waiting": waiting.get(q, 0),
             "running": running.get(q, 0), "dead": dead.get(q, 0)} for q in names]
    from appliance.queues import refusals

    refused = refusals.read_all(home)
    for (source, queue) in sorted(set(refused) - {(r["source"], r["queue"]) for r in rows}):
        rows.append({"source": source, "queue": queue, "waiting": None, "running": None, "dead": None})
    for row in rows:
        held = refused.get((row["source"], row["queue"]), {})
        row["refused"] = len(held)
        row["cannot_run"] = [{"experiment": h.get("experiment"), "reason": h.get("reason"),
                              "refused_by": h.get("refused_by", [])}
                             for h in sorted(held.values(), key=lambda h: str(h.get("experiment")))]
    return rows
