"""appliance jobs: queued, held and running jobs, and where each waiting one stands and why (like squeue)."""

import json

from appliance.api.jobs_client import call
from appliance.jobs.format import format_jobs


def register(sub):
    p = sub.add_parser(
        "jobs", help="queued, held and running jobs, and why each waiting one waits (like squeue)",
        description="Queued, held and running jobs (a member sees their own, an admin all): for a "
                    "waiting one, its place in its queue's fair-share order and why it waits.")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of objects (key, state, owner, queue, slot, why, times, ...)")
    p.set_defaults(func=run)


def run(args) -> int:
    jobs = call(args.home, "GET", "/v1/jobs")["jobs"]
    print(json.dumps(jobs, indent=2) if args.json else format_jobs(jobs))
    return 0
