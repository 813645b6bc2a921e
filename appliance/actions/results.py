"""appliance results EXPERIMENT [--dest DIR]: download and unpack an experiment's outputs.

Its mutable artifacts (output, modeldir, retval, tb, _metrics, _metadata) come from the
appliance's configured store, or from `--endpoint URL` when given, and from nowhere else: the
endpoint a request named (and the runner recorded in HOME/status/experiments/<key>.json) is
anyone's choice, so it never decides where the appliance's keys are sent. The recorded bucket
and key are used when the record names that same endpoint, else `experiments/<key>/<tag>.tar`
in the caller's bucket. A member reads with their own key from their own bucket (another's job
is not there, and their key opens nothing else); root reads with the client identity, or the
admin's for a member's bucket. Each artifact lands in DEST/<tag>/
through the same safe extractor the runners use.
"""

from __future__ import annotations

import sys
from pathlib import Path

from appliance.studioml.artifacts import MUTABLE_DEFAULTS, result_record


def register(sub):
    p = sub.add_parser("results", help="download an experiment's outputs (output, modeldir, ...)",
                       description="Download and unpack the mutable artifacts of EXPERIMENT "
                                   "from the appliance's object store.")
    p.add_argument("experiment", help="experiment key (as printed by `appliance submit`)")
    p.add_argument("--dest", help="folder to unpack into (default: ./EXPERIMENT)")
    p.add_argument("--endpoint", metavar="URL",
                   help="read from this S3 endpoint, with the appliance's client keys (default: the "
                        "appliance's own store; what a request named is never used by itself)")
    p.set_defaults(func=run)


def experiment_artifacts(home, key: str, names=MUTABLE_DEFAULTS, endpoint: str | None = None) -> list:
    """Artifact objects (see studioml.request.Artifact) for `key`'s mutable artifacts at `endpoint`
    (default: the configured store), with the appliance's client store credentials."""
    from appliance.api.submit_client import results_store
    from appliance.studioml.request import Artifact
    from appliance.runner.status import find_experiment

    try:
        record = find_experiment(home, key) or {}
    except PermissionError:
        record = {}  # not in the appliance group: a member reads their own bucket
    creds = results_store(home, record)
    store = (endpoint or creds.endpoint).rstrip("/")
    recorded = record.get("artifacts", {})
    out = []
    for name in names:
        r = recorded.get(name) or {}
        here = str(r.get("endpoint_url") or "").rstrip("/") == store
        here = here and (not creds.private or r.get("bucket") == creds.bucket)  # a member: their bucket only
        out.append(Artifact(
            name=name, key=(here and r.get("key")) or f"experiments/{key}/{name}.tar",
            bucket=(here and r.get("bucket")) or creds.bucket,
            endpoint_url=store, mutable=True, unpack=True, access_key=creds.access_key,
            secret_key=creds.secret_key, region=creds.region, session_token=None))
    return out


def run(args) -> int:
    from appliance.studioml import transfer as arts

    if args.endpoint and not args.endpoint.startswith(("http://", "https://")):
        print(f"appliance results: --endpoint {args.endpoint!r}: give an http:// or https:// URL",
              file=sys.stderr)
        return 2
    dest = Path(args.dest or args.experiment)
    retry = arts.RetryPolicy(attempts=3)
    found = 0
    artifacts = experiment_artifacts(args.home, args.experiment, endpoint=args.endpoint)
    for art in artifacts:
        target = dest / art.name
        try:
            if arts.fetch(art, target, None, retry, 1 << 40) is not None:
                found += 1
                print(f"{art.name:10} -> {target}")
            else:
                target.rmdir()
        except arts.ArtifactError as e:
            print(f"appliance results: {e}", file=sys.stderr)
            return 1
    if found:
        print_record(artifacts, retry)
    from appliance.api.jobs_client import exit_code

    code = exit_code(args.home, args.experiment)  # a failed job's results exit non-zero, saying why
    if not found:
        print(f"appliance results: nothing stored for experiment {args.experiment!r} yet "
              f"(is the key right? `appliance status` shows what runs)", file=sys.stderr)
        return code or 1
    return code


def print_record(artifacts: list, retry) -> None:
    """How the job ended and, for a GPU job, its peak GPU memory and mean utilisation (the result
    record the runner keeps beside the output)."""
    from appliance.studioml import transfer as arts
    from appliance.units import format_size

    where = result_record({a.name: a for a in artifacts})
    try:
        record = arts.read_record(where, retry) if where else None
    except arts.ArtifactError:
        return
    if not record:
        return
    print(f"{'ended':10} {record.get('outcome')}" + (f": {record['reason']}" if record.get("reason") else ""))
    if record.get("report"):
        from appliance.runner.classes import report_line
        print(f"{'report':10} {report_line(record['report'])}")
    elif record.get("class"):
        print(f"{'class':10} {record['class']}")
    use = record.get("gpu")
    if use:
        util = use.get("util_mean_pct")
        print(f"{'gpu':10} peak {format_size(use.get('peak_memory_bytes') or 0)} of a "
              f"{format_size(use.get('share_bytes') or 0)} share, mean utilisation "
              f"{'unknown' if util is None else f'{util:g}%'}")
