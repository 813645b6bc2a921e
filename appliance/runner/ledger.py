"""The exactly-once ledger: everything that decides whether a request has run and is settled.

A job's workload ends once. Before any upload the runner writes JOB/.ended.json (how it ended)
and JOB/.request.json (the message body) in the job dir on this box; then it uploads the
mutable artifacts, and records the result in the store (`appliance-result.json` beside the
experiment's artifacts, state "ended" then "done"). A request claimed again (redelivered,
released, a copy in another queue) is settled from that record without running again; a job
dir whose workload ended but whose uploads did not all reach the store is finished later by
whichever runner of this box finds it unlocked (`resume_finished`, `finished_job_dir`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

from appliance.studioml import transfer
from appliance.studioml.artifacts import result_record
from appliance.studioml.transfer import ArtifactError, RetryPolicy, StoreUnavailable, Uploader
from appliance.studioml.keys import job_dir_name
from appliance.studioml.request import parse_request

log = logging.getLogger("appliance.runner")

ENDED = ".ended.json"  # JOB/.ended.json: the workload ended, how; written before any upload
REQUEST = ".request.json"  # JOB/.request.json: the message body, to finish the uploads later
LOCK = ".lock"  # held by the runner working on JOB


def finished_job_dir(home, key: str) -> Optional[Path]:
    """A job dir on this box (any slot) whose workload ended but whose uploads are not known to
    be done, and that no live runner holds; None if there is none."""
    for d in Path(home.work_dir).glob(f"*/{job_dir_name(key)}"):
        try:
            ended = json.loads((d / ENDED).read_text())
        except (OSError, ValueError):
            continue
        if ended.get("experiment") == key and _unlocked(d):
            return d
    return None


def _unlocked(job_dir: Path) -> bool:
    try:
        with open(job_dir / LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def finish_uploads(job_dir: Path, retry: RetryPolicy, user: Optional[tuple]) -> dict:
    """Upload every mutable artifact of a finished job dir, then mark it done in the store and
    remove the dir. Returns the ended record. StoreUnavailable leaves everything in place."""
    with open(job_dir / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ended = json.loads((job_dir / ENDED).read_text())
        req = parse_request((job_dir / REQUEST).read_bytes())
        Uploader(req.artifacts, job_dir, retry, user[0] if user else None).upload_changed()
        record = result_record(req.artifacts)
        if record is not None:
            transfer.write_record(record, {**ended, "state": "done"}, retry)
        shutil.rmtree(job_dir, ignore_errors=True)
    return ended

def resume_finished(root: Path, retry: RetryPolicy, user: Optional[tuple], stopping) -> None:
    """Finish the uploads of jobs whose workload ended in `root` (one slot's work folder) but
    whose outputs did not all reach the store (runner killed while uploading, store down): the
    result record then tells whoever claims the message next that it is done."""
    for d in sorted(root.iterdir()):
        if not (d / ENDED).is_file() or stopping():
            continue
        try:
            finish_uploads(d, retry, user)
        except StoreUnavailable as e:
            log.info("finished job %s: uploads wait for the store: %s", d.name, e)
        except Exception as e:  # noqa: BLE001 - one broken leftover must not stop the runner
            log.warning("finished job %s: cannot complete its uploads: %s", d.name, e)


DONE = "done"  # the request ran and its outputs are in the store: settle it as it ended
WAIT = "wait"  # its workload ended elsewhere, uploads in flight: hold it back


def prior_run(record: dict, store_wait_s: float, now: float) -> Optional[str]:
    """What the result record of a request says about running it now: DONE, WAIT (ended but
    not done, recently), or None (its box is taken for dead after store_wait_s: run again)."""
    if record.get("state") == "done":
        return DONE
    if now - float(record.get("finished") or 0) < store_wait_s:
        return WAIT
    return None


def write_result(record_art, data: dict, retry: RetryPolicy, key: str) -> None:
    """Write the result record (a failure is logged: the job dir still holds the truth)."""
    if record_art is not None:
        try:
            transfer.write_record(record_art, data, retry)
        except ArtifactError as e:
            log.warning("%s: result record: %s", key, e)


def record_cancel(body: bytes, who: str, retry: Optional[RetryPolicy] = None) -> bool:
    """Write in the ledger that this request was cancelled before it ran: its result record says
    done, outcome cancelled, so whichever box claims it (a copy still on a shared broker) settles
    it unrun (Job.already_ran). A record already there (it ran, or is running) is left alone.
    False when the request has no place for a record, or the store did not take it."""
    req = parse_request(body)
    art = result_record(req.artifacts)
    if art is None:
        return False
    retry = retry or RetryPolicy(attempts=2)
    try:
        if transfer.read_record(art, retry) is not None:
            return False
        transfer.write_record(art, {"state": "done", "outcome": "cancelled", "class": "cancelled", "exit_code": None,
                                    "reason": f"cancelled by {who} before it ran", "finished": time.time(),
                                    "experiment": req.key}, retry)
        return True
    except ArtifactError as e:
        log.warning("%s: recording its cancel in the ledger: %s", req.key, e)
        return False
