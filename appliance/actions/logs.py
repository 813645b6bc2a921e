"""appliance logs EXPERIMENT [-f]: print an experiment's output (stdout and stderr).

While a slot runs the experiment, its output is read from that slot's local output file
(what the workload printed a moment ago); `-f` follows it until the job ends (and, for a job
still waiting in a local queue or being prepared, first waits for it to start). Otherwise the
`output` artifact is read from the store (what the last upload holds).
"""

from __future__ import annotations

import io
import sys
import tarfile
import time
from pathlib import Path

from appliance.api.jobs_client import exit_code


def register(sub):
    p = sub.add_parser("logs", help="print (or follow) an experiment's output",
                       description="Print the output of EXPERIMENT: live from its slot while "
                                   "it runs, else from the object store.")
    p.add_argument("experiment", help="experiment key")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new output until the experiment stops running")
    p.set_defaults(func=run)


def output_from_tar(data: bytes) -> bytes:
    """The `output` file in an output artifact (ours: `output`; a StudioML client's single-file
    form: `./output`); else every file in it, concatenated."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        files = [m for m in tar.getmembers() if m.isfile()]
        named = [m for m in files if m.name.rsplit("/", 1)[-1] == "output"]
        return b"".join(tar.extractfile(m).read() for m in (named[:1] or files))


def stored_output(home, key: str) -> bytes | None:
    from appliance.actions.results import experiment_artifacts
    from appliance.studioml import transfer as arts
    from appliance.studioml.transfer import client_for

    (art,) = experiment_artifacts(home, key, names=("output",))
    c = client_for(art)
    try:
        obj = arts.with_retries(lambda: c.get_object(Bucket=art.bucket, Key=art.key), art,
                                "reading", arts.RetryPolicy(attempts=3))
    except arts.ArtifactMissing:
        return None
    return output_from_tar(obj["Body"].read())


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def follow(home, key: str, path: Path, poll_s: float = 0.5) -> None:
    from appliance.runner.status import running_slot

    pos = 0
    while True:
        running = running_slot(home, key)
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
        except FileNotFoundError:  # the job ended and its folder is gone: the rest is stored
            data = b""
            if running is None:
                data = (stored_output(home, key) or b"")[pos:]
        if data:
            _write(data)
            pos += len(data)
        if running is None:
            return
        time.sleep(poll_s)


def _waiting_locally(home, key: str) -> bool:
    """Whether a local queue holds `key`, waiting or claimed (a slot is preparing it)."""
    from appliance.queues.depths import pending_local_requests

    try:
        return any((b.get("experiment") or {}).get("key") == key for b in pending_local_requests(home)
                   if isinstance(b, dict))
    except OSError:
        return False


def _wait_for_output(home, key: str, running, poll_s: float = 0.5):
    """`logs -f` of a job still queued or being prepared waits for its output to appear; the
    slot's status when it has, or None once it is neither queued nor running (ended, or the
    key is wrong: the stored output says which)."""
    from appliance.runner.status import running_slot

    while True:
        if running and running.get("output") and Path(running["output"]).exists():
            return running
        if running is None and not _waiting_locally(home, key):
            return None
        time.sleep(poll_s)
        running = running_slot(home, key)


def wait_to_start(home, key: str, poll_s: float = 1.0) -> None:
    """While the job waits in its queue, say where it stands (again when that changes)."""
    from appliance.api.jobs_client import job_state

    said = None
    while True:
        state = job_state(home, key)
        jobs = (state or {}).get("jobs") or []
        if len(jobs) != 1 or jobs[0]["state"] not in ("queued", "held"):
            return
        why = jobs[0].get("why") or jobs[0]["state"]
        if why != said:
            print(f"appliance: {key} waits: {why}", file=sys.stderr, flush=True)
            said = why
        time.sleep(poll_s)


def run(args) -> int:
    import os

    if os.geteuid() != 0:
        return run_as_member(args)
    from appliance.studioml import transfer as arts
    from appliance.runner.status import running_slot

    key = args.experiment
    if args.follow:
        wait_to_start(args.home, key)
    running = running_slot(args.home, key)
    if running is None and args.follow:  # between its claim and its start: give it a moment
        for _ in range(20):
            time.sleep(0.5)
            running = running_slot(args.home, key)
            if running is not None or (exit_code_known(args.home, key)):
                break
    if args.follow:
        running = _wait_for_output(args.home, key, running)
    if running and running.get("output") and Path(running["output"]).exists():
        path = Path(running["output"])
        if args.follow:
            follow(args.home, key, path)
            return exit_code(args.home, key, wait=10)
        _write(path.read_bytes())
        return 0
    try:
        data = stored_output(args.home, key)
    except arts.ArtifactError as e:
        print(f"appliance logs: {e}", file=sys.stderr)
        return 1
    if data is None:
        where = f"slot {running['slot']} is preparing it" if running else \
            "it has not started (or the key is wrong)"
        print(f"appliance logs: no output for experiment {key!r} yet: {where}",
              file=sys.stderr)
        return exit_code(args.home, key) or 1
    _write(data)
    code = exit_code(args.home, key)  # says how a failed or dead-lettered job ended
    return code if args.follow else 0


def run_as_member(args) -> int:
    """A member's logs: live through the API while their job runs, else from their own bucket
    with their own key (appliance/api/logs_routes.py)."""
    from appliance.api.client import ApiClientError, Client
    from appliance.studioml import transfer as arts

    key, pos = args.experiment, 0
    if args.follow:
        wait_to_start(args.home, key)  # says where it stands in line

    def started(headers) -> None:
        if headers.get("X-Appliance-Job-State") == "queued":
            print(f"appliance logs: {key} is queued; waiting for it to start", file=sys.stderr, flush=True)

    client = Client(args.home, timeout=None if args.follow else 300.0)
    try:
        for chunk in client.stream("GET", f"/v1/logs/{key}?follow={int(args.follow)}", on_start=started):
            _write(chunk)
            pos += len(chunk)
        if not args.follow:
            return 0
        if pos:
            return exit_code(args.home, key, wait=10)
    except ApiClientError as e:
        if e.status not in (404, 409):
            raise
        if e.status == 409:
            print(f"appliance logs: {e}", file=sys.stderr)
            return 1
    try:
        data = stored_output(args.home, key)
    except arts.ArtifactError as e:
        print(f"appliance logs: {e}", file=sys.stderr)
        return 1
    if data is None and not pos:
        print(f"appliance logs: no output for experiment {key!r} of yours: it has not started (or the key "
              "is wrong, or it is someone else's)", file=sys.stderr)
        return exit_code(args.home, key) or 1
    _write((data or b"")[pos:])
    return exit_code(args.home, key) if args.follow else 0


def exit_code_known(home, key: str) -> bool:
    from appliance.api.jobs_client import job_state

    state = job_state(home, key)
    return bool(state and state.get("code") is not None)
