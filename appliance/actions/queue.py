"""appliance queue: what is waiting, running and dead-lettered in the queues the appliance knows.

Every source: the local directory queue (home/studioml/queue/local*), and the RabbitMQ and SQS
queues of the credentials directory, asked live (appliance/queues/depths.py), with the requests
waiting there that no slot of this box can run (refused: left for other appliances), and why
(status/refusals/).
"""

from __future__ import annotations

import json
import sys

from appliance.queues.depths import local_queue as _local
from appliance.queues.depths import queue_table
from appliance.queues.local import DEAD, no_access


def register(sub):
    p = sub.add_parser("queue", help="list queues and their depth, or dead-lettered messages")
    qs = p.add_subparsers(dest="queue_action", metavar="{ls,dead}")
    ls = qs.add_parser("ls", help="queues: waiting, running and dead-lettered counts")
    ls.add_argument("--json", action="store_true", help="print the same facts as JSON")
    dead = qs.add_parser("dead", help="dead-lettered messages and why")
    dead.add_argument("--json", action="store_true", help="print the same facts as JSON")
    p.set_defaults(func=run, queue_action="ls", json=False)


def _experiment_key(path) -> str | None:
    """The experiment key inside a message file, if it is readable JSON that has one, as a
    printable string. A dead letter is whatever a submitter sent: nesting deep enough to exhaust
    the parser's recursion, a key that is no string or carries terminal escapes are not shown."""
    try:
        key = json.loads(path.read_bytes())["experiment"]["key"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return key if isinstance(key, str) and key.isprintable() and len(key) <= 500 else None


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
    from appliance.status import disk_problem
    full = disk_problem(args.home)
    if full:
        print(full)
    if not rows:
        print(f"no queues yet ({args.home.queue_root} is empty); `appliance submit` creates one")
        return 0
    header = ("SOURCE", "QUEUE", "WAITING", "RUNNING", "DEAD", "CANNOT RUN HERE")

    def shown(v):
        return "-" if v is None else str(v)

    table = [header] + [(r["source"], r["queue"], shown(r["waiting"]), shown(r["running"]),
                         shown(r["dead"]), str(r["refused"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for r in rows:
        if r.get("problem"):
            print(f"{r['source']}" + (f"/{r['queue']}" if r["queue"] != "-" else "") + f": {r['problem']}")
    held = [(r, h) for r in rows for h in r["cannot_run"]]
    if held:
        print("\nwaiting, but no slot of this box can run them (left for other appliances):")
        for r, h in held:
            print(f"  {r['source']}/{r['queue']} {h['experiment']}: {h['reason']} "
                  f"(refused by {len(h['refused_by'])} appliance(s) so far)")
    return 0
