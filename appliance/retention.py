"""What `appliance gc` removes from the store: pure policy over a listing, table-tested in
tests/test_gc.py.

- a workspace (`blobstore/<sha256>.tar`, any immutable artifact a request names) goes when no
  message waiting in or claimed from a local queue names it and it was stored before the
  cutoff (the retention keeps what a RabbitMQ or SQS message, which cannot be read without
  taking it, may still name);
- an experiment's results (`experiments/<key>/...`) go when every one of its objects was
  stored before the cutoff and no waiting or claimed message is that experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Doomed:
    workspaces: list = field(default_factory=list)       # keys
    experiments: dict = field(default_factory=dict)      # experiment key -> [object keys]
    bytes: int = 0


def select(objects: list, needed_keys: set, needed_experiments: set, cutoff: float) -> Doomed:
    """`objects`: [(key, size, stored_at epoch seconds)] of the bucket."""
    out = Doomed()
    results: dict = {}
    for key, size, stored in objects:
        if key.startswith("blobstore/"):
            if key not in needed_keys and stored < cutoff:
                out.workspaces.append(key)
                out.bytes += size
        elif key.startswith("experiments/"):
            parts = key.split("/")
            if len(parts) >= 3 and parts[1]:
                results.setdefault(parts[1], []).append((key, size, stored))
    for exp, objs in sorted(results.items()):
        if exp in needed_experiments or any(stored >= cutoff for _k, _s, stored in objs):
            continue
        out.experiments[exp] = [k for k, _s, _t in objs]
        out.bytes += sum(s for _k, s, _t in objs)
    return out
