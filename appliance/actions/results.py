"""appliance results EXPERIMENT [--dest DIR]: download and unpack an experiment's outputs.

Its mutable artifacts (output, modeldir, retval, tb, _metrics, _metadata) come from where the
runner recorded them (HOME/status/experiments/<key>.json), else from the appliance's store at
`experiments/<key>/<tag>.tar`, read with the appliance's own store credentials. Each lands in
DEST/<tag>/ through the same safe extractor the runners use.
"""

from __future__ import annotations

import sys
from pathlib import Path

from appliance.runner.artifacts import MUTABLE_DEFAULTS


def register(sub):
    p = sub.add_parser("results", help="download an experiment's outputs (output, modeldir, ...)",
                       description="Download and unpack the mutable artifacts of EXPERIMENT "
                                   "from the appliance's object store.")
    p.add_argument("experiment", help="experiment key (as printed by `appliance submit`)")
    p.add_argument("--dest", help="folder to unpack into (default: ./EXPERIMENT)")
    p.set_defaults(func=run)


def experiment_artifacts(home, key: str, names=MUTABLE_DEFAULTS) -> list:
    """Artifact objects (see runner.request.Artifact) for `key`'s mutable artifacts, with the
    appliance's store credentials."""
    from appliance.config import load_config
    from appliance.runner.request import Artifact
    from appliance.runner.status import find_experiment
    from appliance.store.credentials import load_credentials
    from appliance.store.server import endpoint_url

    config = load_config(home.config_file)
    creds = load_credentials(home)
    record = find_experiment(home, key) or {}
    recorded = record.get("artifacts", {})
    out = []
    for name in names:
        r = recorded.get(name) or {}
        out.append(Artifact(
            name=name, key=r.get("key") or f"experiments/{key}/{name}.tar",
            bucket=r.get("bucket") or config.object_store.bucket,
            endpoint_url=r.get("endpoint_url") or endpoint_url(config),
            mutable=True, unpack=True, access_key=creds.access_key,
            secret_key=creds.secret_key, region=config.object_store.region,
            session_token=None))
    return out


def run(args) -> int:
    from appliance.runner import artifacts as arts

    dest = Path(args.dest or args.experiment)
    retry = arts.RetryPolicy(attempts=3)
    found = 0
    for art in experiment_artifacts(args.home, args.experiment):
        target = dest / art.name
        try:
            if arts.fetch(art, target, None, retry, 1 << 40):
                found += 1
                print(f"{art.name:10} -> {target}")
            else:
                target.rmdir()
        except arts.ArtifactError as e:
            print(f"appliance results: {e}", file=sys.stderr)
            return 1
    if not found:
        print(f"appliance results: nothing stored for experiment {args.experiment!r} yet "
              f"(is the key right? `appliance status` shows what runs)", file=sys.stderr)
        return 1
    return 0
