"""appliance release KEY...: let held jobs start again (like scontrol release)."""

from appliance.actions.hold import act


def register(sub):
    p = sub.add_parser("release", help="let held jobs start again (like scontrol release)",
                       description="Release held jobs (or a whole array by its base key): they wait "
                                   "in their queue again, in their old place.")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.add_argument("--json", action="store_true", help="print the outcome per job as JSON")
    p.set_defaults(func=lambda args: act(args, "release"))
