"""appliance requeue KEY: run a finished job again as a new attempt (like scontrol requeue)."""

import json
import sys

from appliance.api.jobs_client import call


def register(sub):
    p = sub.add_parser(
        "requeue", help="run a finished or failed job again as a new attempt (like scontrol requeue)",
        description="Queue a finished job's request again (same workspace, script and arguments) "
                    "as a new job KEY.rN; `history` shows which job it was requeued from. Prints "
                    "the new key.")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--json", action="store_true", help="print {key, requeued_from, queue} as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    out = call(args.home, "POST", "/v1/jobs/requeue", {"key": args.key})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"requeued {out['requeued_from']} as {out['key']} on {out['queue']}", file=sys.stderr)
        print(out["key"])
    return 0
