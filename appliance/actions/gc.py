"""appliance gc: remove from the store the workspaces no job needs and the results older than
the retention (`object_store.retention`, default 30 days); `--dry-run` says what it would
remove. Which objects go is appliance/retention.py's policy."""

from __future__ import annotations

import sys
import time

from appliance.units import format_size


def register(sub):
    p = sub.add_parser("gc", help="remove old results and workspaces no job needs from the store",
                       description="Remove from the appliance's store the workspaces that no waiting or "
                                   "running local job names and that are older than the retention, and "
                                   "the results of experiments older than the retention "
                                   "(object_store.retention; 0 keeps everything).")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    p.add_argument("--older-than", metavar="DURATION",
                   help="the retention for this run (e.g. 7d), instead of object_store.retention")
    p.set_defaults(func=run)


def needed(bodies: list) -> tuple:
    """(artifact keys, experiment keys) the pending messages name."""
    keys, experiments = set(), set()
    for body in bodies:
        exp = body.get("experiment") if isinstance(body, dict) else None
        if not isinstance(exp, dict):
            continue
        if exp.get("key"):
            experiments.add(str(exp["key"]))
        for art in (exp.get("artifacts") or {}).values():
            if isinstance(art, dict) and art.get("key"):
                keys.add(str(art["key"]))
    return keys, experiments


def run(args) -> int:
    from appliance.config import load_config
    from appliance.queues.depths import pending_local_requests
    from appliance.retention import select
    from appliance.store.client import s3_client
    from appliance.store.credentials import load_credentials
    from appliance.store.server import endpoint_url
    from appliance.units import parse_duration

    home = args.home
    config = load_config(home.config_file)
    try:
        retention = (parse_duration(args.older_than) if args.older_than
                     else config.object_store.retention)
    except ValueError as e:
        print(f"appliance gc: --older-than: {e}", file=sys.stderr)
        return 2
    if not retention:
        print("retention is 0 (object_store.retention): nothing is removed")
        return 0
    creds = load_credentials(home)  # the admin identity: gc is root's
    bucket = config.object_store.bucket
    client = s3_client(endpoint_url(config), creds.access_key, creds.secret_key, config.object_store.region)
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        objects += [(o["Key"], o["Size"], o["LastModified"].timestamp()) for o in page.get("Contents", [])]
    keys, experiments = needed(pending_local_requests(home))
    doomed = select(objects, keys, experiments, time.time() - retention)
    verb = "would remove" if args.dry_run else "removed"
    for key in doomed.workspaces:
        print(f"{verb} workspace {key}")
    for exp in doomed.experiments:
        print(f"{verb} results of {exp}")
    if not args.dry_run:
        every = doomed.workspaces + [k for ks in doomed.experiments.values() for k in ks]
        for i in range(0, len(every), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in every[i:i + 1000]],
                                                         "Quiet": True})
    print(f"{verb} {len(doomed.workspaces)} workspace(s) and the results of {len(doomed.experiments)} "
          f"experiment(s), {format_size(doomed.bytes)}")
    return 0
