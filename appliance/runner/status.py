"""The small status file each runner keeps, and the experiment index `logs`/`results` read.

`HOME/status/<slot>.json` is replaced atomically (write a temp file, rename). A job's steps are
on disk within LAZY_WRITE_S (a second thread writes them), its end at once (every job's result
shows, even in a burst), a runner at rest's at once: a short job costs one write, not five:

    {"state": "idle|fetching|preparing|running|uploading|draining|stopped",
     "slot": ..., "pid": <runner pid>, "updated": <epoch>,
     "experiment": <key or null>, "owner_uid": <its submitter's uid or null>, "queue": ...,
     "source": ..., "started": <epoch or null>,
     "last_upload": <epoch or null>, "output": <local output file while running or null>,
     "workload": {"pid": .., "start_ticks": ..} or null,
     "gpu": the running job's GPU use (runner/gpu.py JobGpu.summary) or null,
     "gpu_held": {"reason", "processes": [{"gpu", "pid", "memory_bytes"}], "since"} or null
                 (the slot claims nothing: a foreign process on its GPUs, MPS missing),
     "gpu_note": why the slot's GPUs are not watched (no NVML) or null,
     "last_result": {"experiment", "outcome", "exit_code", "reason", "finished", "gpu"?} or null}

`HOME/status/experiments/<key>.json` records where an experiment's mutable artifacts live in
the store (endpoint, bucket, key per artifact; never credentials), so `appliance logs` and
`appliance results` find them without guessing the bucket. Records are root's alone (folder
0700, files 0600): they name every member's jobs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any, Optional

from appliance.files import write_atomic

log = logging.getLogger("appliance.runner")

LAZY_WRITE_S = 0.25  # a lazy update is on the disk at most this long after it was made
STATES = ("idle", "fetching", "preparing", "running", "uploading", "draining", "stopped")


def write_json_atomic(path: Path, data: Any, mode: Optional[int] = None) -> None:
    """`data` as JSON, replaced atomically; advisory (status, metrics, the experiment index):
    not synced to the disk."""
    write_atomic(path, json.dumps(data, sort_keys=True) + "\n", mode=mode, sync=False)


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class StatusFile:
    """The runner's own status; `update(**fields)` merges and rewrites the file."""

    def __init__(self, home, slot: str):
        self.path = Path(home.slot_status(slot))
        self.data: dict = {
            "state": "idle", "slot": slot, "pid": os.getpid(), "experiment": None,
            "queue": None, "source": None, "started": None, "last_upload": None,
            "output": None, "workload": None, "last_result": None, "updated": None,
        }
        previous = _read_json(self.path)
        if previous:
            self.data["last_result"] = previous.get("last_result")
        self.previous = previous  # what a runner killed before us left behind
        self.counters = None  # counters.SlotCounters: told of every job start and end
        self.unwritten: Optional[str] = None  # why the last update is in memory only (a full disk)
        self.dirty = False  # lazy updates not written yet
        self._counters_due = False
        self._changed = threading.Condition()  # guards data and the file; wakes the writer
        self._dirty_since = 0.0
        self._writer: Optional[threading.Thread] = None

    def update(self, lazy: bool = False, **fields: Any) -> None:
        """Merge `fields` and rewrite the file. `lazy`: written by the next write, `flush()`, or
        a second thread LAZY_WRITE_S later, whichever comes first: a job's steps cost the runner
        a file write each otherwise (a burst of short jobs: ~5 each), while whoever looks at the
        status sees a step that lasts."""
        state = fields.get("state")
        if state is not None and state not in STATES:
            raise ValueError(f"unknown runner state {state!r}")
        with self._changed:
            self.data.update(fields)
            self.data["updated"] = time.time()
            if not lazy:
                self._write()
            elif not self.dirty:
                self.dirty, self._dirty_since = True, time.monotonic()
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_later, name="status", daemon=True)
                    self._writer.start()
                self._changed.notify()

    def flush(self) -> None:
        """Write what lazy updates left in memory."""
        with self._changed:
            if self.dirty:
                self._write()

    def _write_later(self) -> None:
        with self._changed:
            while True:
                while not self.dirty:
                    self._changed.wait()
                left = self._dirty_since + LAZY_WRITE_S - time.monotonic()
                if left > 0:
                    self._changed.wait(left)  # a write meanwhile makes it clean
                elif self.dirty:
                    self._write()

    def _write(self) -> None:
        """With `_changed` held."""
        self.dirty = False
        if self._counters_due and self.counters is not None:
            self._counters_due = False
            self.counters.save()
        try:
            write_json_atomic(self.path, self.data)
        except OSError as e:  # a full disk never stops a runner: the status waits in memory
            if self.unwritten is None:
                log.warning("%s: status not written (%s); kept in memory until the disk takes it", self.path, e)
            self.unwritten = str(e)
        else:
            self.unwritten = None

    def job_started(self, experiment: str, queue: str, source: str, enqueued: Optional[float] = None,
                    owner_uid: Optional[int] = None, lazy: bool = False) -> None:
        """`owner_uid`: who submitted it, as the kernel said (the queue file's uid); None: unknown."""
        if self.counters is not None:
            with self._changed:  # saved with the status, by whichever writes it
                self.counters.job_started(queue, enqueued, save=False)
                self._counters_due = True
        self.update(state="fetching", experiment=experiment, queue=queue, source=source,
                    started=time.time(), last_upload=None, output=None, workload=None, owner_uid=owner_uid,
                    lazy=lazy)

    def job_finished(self, outcome: str, exit_code: Optional[int], reason: str,
                     gpu: Optional[dict] = None, cls: Optional[str] = None,
                     retry: Optional[int] = None, report: Optional[dict] = None) -> None:
        """`cls`: the failure class (runner/classes.py); worked out from the rest when not given."""
        if cls is None:
            from appliance.runner.classes import classify
            cls = classify(outcome, exit_code, reason)
        if self.counters is not None:
            with self._changed:
                self.counters.job_finished(self.data.get("queue"), outcome, self.data.get("started"), save=False)
                self._counters_due = True
        result = {"experiment": self.data.get("experiment"), "owner_uid": self.data.get("owner_uid"),
                  "outcome": outcome, "class": cls,
                  "exit_code": exit_code, "reason": reason, "finished": time.time()}
        if gpu:
            result["gpu"] = gpu
        if report:
            result["report"] = report  # the per-job report (Job.report)
        if retry:
            result["retry"] = retry  # released to run again: this many retries so far
        self.update(state="idle", last_result=result, experiment=None, queue=None, source=None,
                    started=None, output=None, workload=None, gpu=None)


def read_status(home, slot: str) -> Optional[dict]:
    return _read_json(Path(home.slot_status(slot)))


def all_statuses(home) -> dict[str, dict]:
    out = {}
    d = Path(home.status_dir)
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            data = _read_json(p)
            if data is not None:
                out[p.stem] = data
    return out


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key) or "_"


def experiment_record_path(home, key: str) -> Path:
    return Path(home.status_dir) / "experiments" / f"{_safe_name(key)}.json"


def _records_dir(home) -> Path:
    """HOME/status/experiments, root's alone (0700): it names every member's jobs, and a member
    finds their own results in their own bucket (an older home's 2750 folder is closed here)."""
    folder = Path(home.status_dir) / "experiments"
    folder.mkdir(parents=True, exist_ok=True)
    if stat.S_IMODE(os.stat(folder).st_mode) != 0o700:
        os.chmod(folder, 0o700)
    return folder


def record_experiment(home, key: str, record: dict) -> None:
    _records_dir(home)
    write_json_atomic(experiment_record_path(home, key), record, mode=0o600)


def find_experiment(home, key: str) -> Optional[dict]:
    return _read_json(experiment_record_path(home, key))


def running_slot(home, key: str) -> Optional[dict]:
    """The status of the slot running `key` right now, if any."""
    for data in all_statuses(home).values():
        if data.get("experiment") == key and data.get("state") not in ("idle", "stopped"):
            return data
    return None
