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
    import os

    try:
        owner = args.home.root.stat().st_uid
    except OSError:
        owner = os.geteuid()
    if os.geteuid() not in (0, owner):
        from appliance.api.access import user_name

        print(f"appliance: `down` needs root (the appliance at {args.home.root} belongs to {user_name(owner)}): "
              "ask an admin to run 'sudo appliance down'", file=sys.stderr)
        return 2
    down(args.home, timeout=args.timeout)
    print(f"appliance at {args.home.root} is down")
    return 0
