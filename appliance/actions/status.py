"""appliance status: slots, their CPUs, memory, GPU, current job; the store; GPUs; queues."""

import json

from appliance.api.status_client import status_facts
from appliance.status import format_status


def register(sub):
    p = sub.add_parser("status", help="show slots, jobs, the store, GPUs and queues")
    p.add_argument("--json", action="store_true", help="print the same facts as JSON")
    p.add_argument("--watch", action="store_true",
                   help="show it live, refreshed every second, until q or Ctrl-C (see also `appliance top`)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.watch and not args.json:
        from appliance.actions.top import live, render_status

        return live(lambda: status_facts(args.home), render_status)
    facts = status_facts(args.home)
    print(json.dumps(facts, indent=2) if args.json else format_status(facts))
    return 0
