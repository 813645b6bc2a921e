"""The StudioML wire format: the request model and its validation (request.py), the key,
bucket, endpoint and path rules (keys.py), the artifact layout (artifacts.py) and moving
artifacts to and from the store (transfer.py). The CLI and the runner both import it from
here; it is the one place where every request field is checked before it touches a path, a
process or a URL."""
