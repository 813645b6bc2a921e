"""The artifact layout: where an experiment's artifacts live on disk and in the store.

On disk, the layout StudioML's workload helpers expect (`get_artifact(tag)` falls back to
`cwd/../tag`): `JOB/<artifact name>/` for every artifact, the workload runs in
`JOB/workspace/`, and its stdout+stderr go to `JOB/output/output`. In the store, every artifact
is a tar of a directory at the request's endpoint/bucket/key; the appliance's result record of
a job sits beside its `output` artifact. Moving artifacts is transfer.py's.
"""

from __future__ import annotations

import dataclasses

MUTABLE_DEFAULTS = ("output", "modeldir", "retval", "tb", "_metrics", "_metadata")
OUTPUT_FILE = "output"  # JOB/output/output


def where(art) -> str:
    return f"artifact '{art.name}' at {art.endpoint_url}/{art.bucket}/{art.key}"


RESULT_NAME = "appliance-result.json"


def result_record(artifacts: dict):
    """Where the appliance records that a job's workload ended and its outputs are in the store:
    beside the `output` artifact (`experiments/<key>/appliance-result.json`), with the
    request's own endpoint and credentials. None when the request has no mutable artifact."""
    out = artifacts.get("output") or next((a for a in artifacts.values() if a.mutable), None)
    if out is None:
        return None
    folder = out.key.rsplit("/", 1)[0] + "/" if "/" in out.key else out.key + "."
    return dataclasses.replace(out, name="_appliance_result", key=folder + RESULT_NAME,
                               mutable=True, unpack=False)
