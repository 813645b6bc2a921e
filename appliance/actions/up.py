"""appliance up: start (or update) the appliance and wait until it is healthy."""

from appliance.lifecycle import client_environment, up
from appliance.store.server import endpoint_url


def register(sub):
    p = sub.add_parser("up", help="start the appliance (or apply a changed plan) and wait until healthy",
                       description="Render the configs, start supervisord in the background with the object "
                                   "store and one program per slot, and wait until all are healthy. On a "
                                   "running appliance it applies only the difference. If anything fails "
                                   "it says what, and stops what it started.")
    p.add_argument("--foreground", action="store_true",
                   help="run supervisord in the foreground (what the systemd unit uses)")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for health (default 60)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from appliance.api.access import owner_only

    refused = owner_only(args.home, "up")
    if refused:
        print(f"appliance: {refused}", file=sys.stderr)
        return 2
    prepared = up(args.home, foreground=args.foreground, timeout=args.timeout)
    config = prepared.config
    print(f"appliance up at {args.home.root}: {len(prepared.plan.slots)} slot(s) running; "
          f"store {endpoint_url(config)} bucket {config.object_store.bucket}")
    print(f"submit experiments: STUDIOML_HOME={args.home.studioml_home} (local queue at {args.home.queue_root}),"
          " or `appliance submit SCRIPT`")
    # the keys themselves stay in their 0600 file: a terminal's scrollback, a CI log or a
    # screen share is no place for them
    print("store: `mc ls appliance/` (alias written to ~/.mc/config.json); for boto3 and `aws s3`: "
          f". {args.home.secrets_dir / 's3.env'}  (as root; sets {', '.join(client_environment(args.home, config))})")
    return 0
