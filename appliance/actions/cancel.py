"""appliance cancel KEY...: a waiting job never starts; a running one is stopped (like scancel)."""

from appliance.actions.hold import act


def register(sub):
    p = sub.add_parser(
        "cancel", help="cancel jobs: a waiting one never starts, a running one is stopped (like scancel)",
        description="Cancel jobs (or a whole array by its base key). A queued or held job never "
                    "starts; a running one gets SIGTERM, then SIGKILL after the grace period "
                    "(10 s), and ends `cancelled` with its partial output kept.")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.add_argument("--json", action="store_true", help="print the outcome per job as JSON")
    p.set_defaults(func=lambda args: act(args, "cancel"))
