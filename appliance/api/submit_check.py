"""Whether a member's StudioML request stays inside what is theirs: pure, table-tested.

A request names buckets (each artifact's `bucket` and `qualified` URL, the storage and database
sections), keys (each `credentials.aws.access_key`) and endpoints. Sent by a member through the
API, every one of them must be the member's own (their bucket, their key, this appliance's
store): a request that names another member's bucket is refused before anything runs. The key
is the real guard (the runner reads and writes with the key the request carries, and a member's
key opens their bucket alone); this check makes the mistake or the attempt one clear line.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def _host(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return (parts.hostname or "") + (f":{parts.port}" if parts.port else "")


def _walk(node, path: str):
    """(path, key, value) of every field in a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{path}.{k}" if path else str(k)
            yield here, k, v
            yield from _walk(v, here)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def foreign_reference(request: dict, artifacts: dict, bucket: str, access_key: str, endpoint: str) -> str | None:
    """The first thing in `request` that is not the member's own, as one line; None if all is.

    `artifacts`: the request's artifacts as the runner reads them ({name: Artifact}: bucket,
    endpoint_url, access_key resolved from whichever form the request used)."""
    ours = _host(endpoint)
    for name, art in sorted(artifacts.items()):
        where = f"experiment.artifacts.{name}"
        if art.bucket != bucket:
            return (f"{where} names bucket {art.bucket!r}, which is not yours (yours is {bucket!r}): "
                    "refused before anything runs")
        if _host(art.endpoint_url) != ours:
            return f"{where} names the store {art.endpoint_url!r}; this appliance's is {endpoint!r}"
        if art.access_key not in (access_key, None):
            return (f"{where} carries a store key that is not yours: send your own (`appliance user "
                    "creds`), or let `appliance submit` fill it in")
    for path, key, value in _walk(request, ""):
        if key == "bucket" and value != bucket:
            return (f"{path} names bucket {value!r}, which is not yours (yours is {bucket!r}): refused "
                    "before anything runs")
        if key == "access_key" and value not in (access_key, None, ""):
            return (f"{path} carries a store key that is not yours: send your own (`appliance user "
                    "creds`), or let `appliance submit` fill it in")
        if key == "endpoint" and isinstance(value, str) and value and _host(value) != ours:
            return f"{path} names the store {value!r}; this appliance's is {endpoint!r}"
    return None
