"""appliance wait KEY...: block until the jobs end; exit with their code (0 success, see README)."""

import json
import sys

from appliance.api.jobs_client import call, quote
from appliance.jobs import policy

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
            ends = ", ".join(f"{j['key']} {j['state']}" + (f" ({j['exit_code']})" if j.get("exit_code") else "")
                             for j in out["jobs"])
            print(f"{key}: {ends}" if len(out["jobs"]) > 1 or out["jobs"][0]["key"] != key else ends,
                  file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=2))
    return policy.array_code(codes)
