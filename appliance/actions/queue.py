"""appliance queue: what is waiting, running and dead-lettered in the queues the appliance knows.

Only the local directory queue (home/studioml/queue/local*) is known so far; RabbitMQ and SQS
sources join the table when they exist.
"""

from __future__ import annotations

import json
import sys

from appliance.config import load_config
from appliance.queues.local import DEAD, LocalQueueSource, no_access


def register(sub):
    p = sub.add_parser("queue", help="list queues and their depth, or dead-lettered messages")
    qs = p.add_subparsers(dest="queue_action", metavar="{ls,dead}")
    ls = qs.add_parser("ls", help="queues: waiting, running and dead-lettered counts")
    ls.add_argument("--json", action="store_true", help="print the same facts as JSON")
    dead = qs.add_parser("dead", help="dead-lettered messages and why")
    dead.add_argument("--json", action="store_true", help="print the same facts as JSON")
    p.set_defaults(func=run, queue_action="ls", json=False)


def _local(home) -> LocalQueueSource:
    """The local queue, its expired dead letters gone (when we may delete them)."""
    local = LocalQueueSource(home.queue_root, watch=False,
                             dead_ttl_s=load_config(home.config_file).queues.dead_ttl)
    try:
        local.sweep_dead()
    except PermissionError:
        pass  # not a member of the appliance group: the runners sweep
    return local


def queue_table(home) -> list:
    """One row per queue: source, queue, waiting, running, dead."""
    local = _local(home)
    waiting, running, dead = local.depths(), local.claimed_counts(), local.dead_counts()
    names = sorted(set(waiting) | set(running) | set(dead))
    return [{"source": local.name, "queue": q, "waiting": waiting.get(q, 0),
             "running": running.get(q, 0), "dead": dead.get(q, 0)} for q in names]


def _experiment_key(path) -> str | None:
    """The experiment key inside a message file, if it is readable JSON that has one."""
    try:
        return json.loads(path.read_bytes())["experiment"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run(args) -> int:
    try:
        return _run(args)
    except PermissionError:
        print(f"appliance queue: {no_access(args.home.queue_root)}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.queue_action == "dead":
        local = _local(args.home)
        rows = [{"queue": q, "message": m, "experiment": _experiment_key(local.root / DEAD / q / m),
                 "reason": r} for q, m, r in local.dead_letters()]
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("no dead-lettered messages")
        else:
            for row in rows:
                key = f" (experiment {row['experiment']})" if row["experiment"] else ""
                print(f"{row['queue']}/{row['message']}{key}: {row['reason']}")
        return 0
    rows = queue_table(args.home)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no queues yet ({args.home.queue_root} is empty); `appliance submit` creates one")
        return 0
    header = ("SOURCE", "QUEUE", "WAITING", "RUNNING", "DEAD")
    table = [header] + [(r["source"], r["queue"], str(r["waiting"]), str(r["running"]),
                         str(r["dead"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
