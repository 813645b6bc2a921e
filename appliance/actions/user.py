"""appliance user add NAME | creds: members' own store identities.

`user add NAME` (root) gives the local account NAME its store identity and bucket now (else it is
made the first time NAME uses the appliance). `user creds` prints the caller's own identity as
`export` lines for `aws s3`, boto3 and the StudioML client: a member's key opens their bucket
alone, and only they (or root) can ask for it.
"""

from __future__ import annotations

import os
import sys


def register(sub):
    p = sub.add_parser("user", help="members' store identities (user add NAME, user creds)",
                       description="Each member has a store identity of their own, scoped to their own "
                                   "bucket, made when they first use the appliance.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    add = verbs.add_parser("add", help="give the local account NAME its store identity now (root)")
    add.add_argument("name", help="a local account (useradd makes one)")
    add.set_defaults(func=run_add)
    creds = verbs.add_parser("creds", help="print your own store identity as export lines (for aws s3, "
                                           "boto3, StudioML)")
    creds.set_defaults(func=run_creds)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_add(args) -> int:
    import pwd

    from appliance import supervisor
    from appliance.api.members import member_store
    from appliance.config import load_config

    if os.geteuid() != 0:
        print("appliance user add: needs root: ask an admin to run 'sudo appliance user add "
              f"{args.name}'", file=sys.stderr)
        return 2
    try:
        account = pwd.getpwnam(args.name)
    except KeyError:
        print(f"appliance user add: no local account named {args.name!r}: make it first "
              f"(sudo useradd {args.name})", file=sys.stderr)
        return 2
    config = load_config(args.home.config_file)
    store = member_store(args.home, config, account.pw_uid, account.pw_name, running=supervisor.is_running(args.home))
    print(f"{account.pw_name} (uid {account.pw_uid}): bucket {store.bucket}"
          + ("" if store.private else " (shared: this store has no per-member identities)"))
    return 0


def run_creds(args) -> int:
    from appliance.api.members import environment_lines
    from appliance.api.submit_client import submit_store

    sys.stdout.write(environment_lines(submit_store(args.home)))
    return 0
