"""appliance history: finished jobs with how they ended and what they used (like sacct)."""

import json
import time
import urllib.parse

from appliance.actions import UserError
from appliance.api.jobs_client import call
from appliance.jobs.format import format_history
from appliance.units import parse_duration


def register(sub):
    p = sub.add_parser(
        "history", help="finished jobs: state, class, exit code, wall, CPU, peak memory (like sacct)",
        description="Finished jobs, the latest first (a member sees their own, an admin all).")
    p.add_argument("--owner", help="only this user's jobs (a name or uid; an admin's filter)")
    p.add_argument("--state", choices=["done", "failed", "cancelled"], help="only jobs that ended so")
    p.add_argument("--since", help="only jobs that ended in this past span, e.g. 2h, 3d, 30m")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default: 100)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.set_defaults(func=run)


def run(args) -> int:
    query = {"limit": str(args.limit)}
    if args.owner:
        query["owner"] = args.owner
    if args.state:
        query["state"] = args.state
    if args.since:
        try:
            query["since"] = str(time.time() - parse_duration(args.since))
        except ValueError as e:
            raise UserError(f"--since {args.since}: {e}") from None
    jobs = call(args.home, "GET", "/v1/history?" + urllib.parse.urlencode(query))["jobs"]
    print(json.dumps(jobs, indent=2) if args.json else format_history(jobs))
    return 0
