"""appliance hold KEY...: keep queued jobs from starting until released (like scontrol hold)."""

import json
import sys

from appliance.api.jobs_client import call


def register(sub):
    p = sub.add_parser("hold", help="keep queued jobs from starting (like scontrol hold)",
                       description="Hold queued jobs (or a whole array by its base key): they keep "
                                   "their place but no slot starts them until `appliance release`.")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.add_argument("--json", action="store_true", help="print the outcome per job as JSON")
    p.set_defaults(func=lambda args: act(args, "hold"))


def act(args, verb: str) -> int:
    """POST /v1/jobs/VERB for the keys; one line per job; rc 1 if any was not changed."""
    results = call(args.home, "POST", f"/v1/jobs/{verb}", {"keys": args.keys})["results"]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["message"], file=sys.stdout if r["done"] else sys.stderr)
    return 0 if all(r["done"] for r in results) else 1
