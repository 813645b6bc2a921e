"""appliance wait KEY...: block until the jobs end; exit with their code (0 success, see README)."""

import json
import sys

from appliance.api.jobs_client import call, quote
from appliance.jobs import policy
from appliance.jobs.format import exit_text

POLL_S = 30  # each call waits up to this long on the API side


def register(sub):
    p = sub.add_parser(
        "wait", help="block until jobs end; exit with the job's exit code",
        description="Wait until every named job (or every member of an array, by its base key) "
                    "has ended. Exits 0 when all succeeded, else with the first failure's code: "
                    "the job's own exit code, 124 timed out or hung, 125 never ran (dead-lettered), "
                    "137 killed for memory, 143 cancelled.")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.add_argument("--json", action="store_true", help="print each job's final record as JSON")
    p.set_defaults(func=run)


def ended(job: dict) -> str:
    """How a job ended, in a few words: `done`, `failed [user] exit code 3`, `cancelled`."""
    text = job["state"]
    if job["state"] == "failed":
        text += f" [{job.get('class')}]"
        code = job.get("exit_code")
        if code is not None:
            text += " " + (exit_text(code) if code < 0 else f"exit code {code}")
        elif job.get("reason"):
            text += f": {job['reason']}"
    return text


def run(args) -> int:
    codes, records = [], []
    for key in args.keys:
        while True:
            out = call(args.home, "GET", f"/v1/jobs/{quote(key)}?wait={POLL_S}", timeout=POLL_S + 30)
            if out["code"] is not None:
                break
        codes.append(out["code"])
        records.append(out)
        if not args.json:
            for j in out["jobs"]:
                print(f"{j['key']}: {ended(j)}", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=2))
    return policy.array_code(codes)
