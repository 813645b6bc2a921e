"""The StudioML wire format, the one room every request passes through before it touches a
path, a process or a URL. The CLI (actions/) and the runner both import it from here.

- request.py: the request model, parsed and checked once (`parse_request`, `BadRequest`)
- keys.py: key, bucket, endpoint, script and artifact-name rules; key -> file name on this box
- artifacts.py: the artifact layout (on disk, in the store, the result record's place)
- transfer.py, uploader.py: moving artifacts to and from the store (retries, errors); a job's uploads
- packing.py, safetar.py: the tar format, written like the client and unpacked safely
"""
