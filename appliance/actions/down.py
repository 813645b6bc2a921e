"""appliance down: stop everything gracefully; running jobs drain first."""

import sys

from appliance.lifecycle import down


def register(sub):
    p = sub.add_parser("down", help="stop the appliance (slots drain, then the store)",
                       description="Stop every slot (each runner finishes or checkpoints its job within "
                                   "runner.drain_timeout), then the store and supervisord. Nothing is left "
                                   "running.")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for everything to stop (default: drain timeout + 2 min)")
    p.set_defaults(func=run)


def run(args) -> int:
    from appliance.api.access import owner_only

    refused = owner_only(args.home, "down")
    if refused:
        print(f"appliance: {refused}", file=sys.stderr)
        return 2
    down(args.home, timeout=args.timeout)
    print(f"appliance at {args.home.root} is down")
    return 0
