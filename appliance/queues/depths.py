"""How many messages wait, run and lie dead in each queue, from whichever source: the local
directory queue, and every RabbitMQ and SQS entry of the credentials directory (asked live:
the broker's management API, SQS's queue attributes). Used by /metrics, `queue ls`, `status`
and `top`."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import stat
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


def queue_table(home, config=None) -> list:
    """One row per queue of every source: source, queue, waiting, running, dead (None: not
    known here), `problem` (why not, "" when known), and `refused`: requests waiting there that
    no slot of this box can run, with `cannot_run` why.

    RabbitMQ and SQS queues are asked live, from the credentials directory as it is now (a new
    entry shows at once); where that directory is not ours to read, the sources the controller
    last found (run/sources.json) are listed with their depths unknown."""
    local = local_queue(home)
    waiting, running, dead = local.depths(), local.claimed_counts(), local.dead_counts()
    names = sorted(set(waiting) | set(running) | set(dead))
    rows = [{"source": local.name, "queue": q, "waiting": waiting.get(q, 0),
             "running": running.get(q, 0), "dead": dead.get(q, 0), "problem": ""} for q in names]
    rows += _remote_rows(home, config)
    from appliance.queues import refusals

    refused = refusals.read_all(home)
    for (source, queue) in sorted(set(refused) - {(r["source"], r["queue"]) for r in rows}):
        rows.append({"source": source, "queue": queue, "waiting": None, "running": None, "dead": None,
                     "problem": ""})
    for row in rows:
        held = refused.get((row["source"], row["queue"]), {})
        row["refused"] = len(held)
        row["cannot_run"] = [{"experiment": h.get("experiment"), "reason": h.get("reason"),
                              "refused_by": h.get("refused_by", [])}
                             for h in sorted(held.values(), key=lambda h: str(h.get("experiment")))]
    return rows


def _remote_rows(home, config) -> list:
    from appliance.queues import sources as qsources

    if config is None:
        from appliance.config import load_config

        config = load_config(home.config_file)
    root = qsources.credentials_dir(home, config)
    rows: list = []

    def unknown(source: str, queues, problem: str) -> None:
        problem = re.sub(r"(\w+://[^:/\s@'\"]+):[^@\s'\"]+@", r"\1:***@", problem)  # no passwords shown
        for q in queues or ["-"]:
            rows.append({"source": source, "queue": q, "waiting": None, "running": None,
                         "dead": None, "problem": problem})

    if not os.access(root, os.R_OK | os.X_OK) and root.exists():
        try:
            known = json.loads(qsources.sources_file(home).read_text()).get("sources", [])
        except (OSError, ValueError):
            known = []
        for src in known:
            if src.get("name") != "local":
                unknown(str(src.get("name")), src.get("queues"),
                        f"depth unknown: {root} is not readable by you (see /metrics or run as root)")
        return rows
    for entry in qsources.read_entries(root):
        if entry.error:
            unknown(entry.source_name, [], f"{entry.name}: {entry.error}")
            continue
        try:
            got = (rabbit_depths(entry.source_name, entry.spec) if entry.kind == "rabbitmq" else
                   sqs_depths(entry.source_name, entry.spec))
        except Exception as e:  # noqa: BLE001 - shown beside the source, the rest goes on
            unknown(entry.source_name, [], f"cannot ask it: {type(e).__name__}: {e}")
            continue
        counts: dict = {}
        for _source, queue, state, n in got:
            counts.setdefault(queue, {"waiting": 0, "running": 0, "dead": 0})[state] += n
        if not counts:
            unknown(entry.source_name, [], "no queues yet")
        for queue in sorted(counts):
            rows.append({"source": entry.source_name, "queue": queue, **counts[queue], "problem": ""})
    return rows


MAX_MESSAGE_BYTES = 16 * 2**20  # a request is a few KiB; a bigger file is no request


def pending_local_requests(home) -> list:
    """The JSON bodies of the messages waiting in or claimed from the local queues. Any member
    of the queue's group writes there: links, fifos, huge or hostile files are passed over."""
    root = home.queue_root
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    claimed = root / ".claimed"
    if claimed.is_dir():
        folders += [p for p in claimed.iterdir() if p.is_dir() and not p.is_symlink()]
    bodies = []
    for folder in folders:
        if folder.is_symlink():
            continue
        for f in folder.iterdir():
            if f.name == "lock.lock" or f.name.startswith("."):
                continue
            try:
                fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MESSAGE_BYTES:
                    continue
                with os.fdopen(fd, "rb", closefd=False) as fh:
                    bodies.append(json.loads(fh.read(MAX_MESSAGE_BYTES)))
            except (OSError, ValueError, RecursionError):
                continue
            finally:
                os.close(fd)
    return bodies
