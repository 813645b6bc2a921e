"""What only a runner knows, counted for `/metrics`: `HOME/status/metrics/<slot>.json`.

The runner rewrites the file atomically when a job starts and when it ends, and loads it again
when it starts, so the counts survive a runner restart (Prometheus counters must only go up).
The controller reads these files on every scrape (appliance/metrics.py); nothing here talks to
the network.

    {"slot": "slot-0", "updated": <epoch>,
     "jobs_started": {queue: n}, "jobs_finished": {queue: {outcome: n}},
     "job_seconds": {queue: histogram}, "wait_seconds": {queue: histogram},
     "env_cache": {"hits", "misses", "build_failures", "build_seconds"},
     "artifact_cache": {"hits", "misses", "hit_bytes", "miss_bytes"},
     "store_errors": {"unavailable", "access_denied", "other"}}

A histogram is {"le": [upper bounds], "counts": [cumulative counts], "sum": s, "count": n}.
The cache and store figures are the runner's live counts (ArtifactCache.stats, VenvCache.stats,
artifacts.STORE_ERRORS) added to what the file held when the runner started.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

from appliance.runner.status import write_json_atomic

log = logging.getLogger("appliance.runner.counters")

# seconds: a job runs minutes to a day; a request waits from a blink to hours
JOB_BUCKETS = (1, 10, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400)
WAIT_BUCKETS = (0.5, 1, 5, 15, 60, 300, 900, 3600, 14400, 86400)
UNKNOWN_QUEUE = "unknown"


def counters_path(home, slot: str) -> Path:
    return Path(home.status_dir) / "metrics" / f"{slot}.json"


def read_counters(home, slot: str) -> Optional[dict]:
    try:
        data = json.loads(counters_path(home, slot).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def observe(hist: Optional[dict], value: float, bounds: tuple) -> dict:
    """`hist` with one more observation (a fresh one if it was kept with other bounds)."""
    if not hist or hist.get("le") != list(bounds):
        hist = {"le": list(bounds), "counts": [0] * len(bounds), "sum": 0.0, "count": 0}
    hist["counts"] = [c + (1 if value <= le else 0) for c, le in zip(hist["counts"], bounds)]
    hist["sum"] += value
    hist["count"] += 1
    return hist


class SlotCounters:
    """The runner's counters; `live` is {section: object with a `stats` dict, or a dict}."""

    def __init__(self, home, slot: str, **live):
        self.path = counters_path(home, slot)
        self.live = live
        self.data = read_counters(home, slot) or {}
        self.data["slot"] = slot
        for key in ("jobs_started", "jobs_finished", "job_seconds", "wait_seconds"):
            if not isinstance(self.data.get(key), dict):
                self.data[key] = {}
        # what earlier runners of this slot counted; this one's live counts add to it
        self.base = {name: self.data[name] if isinstance(self.data.get(name), dict) else {} for name in live}

    def _live(self, name: str) -> dict:
        source = self.live[name]
        return source if isinstance(source, dict) else getattr(source, "stats", {})

    def job_started(self, queue: Optional[str], enqueued: Optional[float] = None, save: bool = True) -> None:
        """Count a start; `save=False`: in memory until the next save (the status file's)."""
        try:
            self._job_started(queue or UNKNOWN_QUEUE, enqueued, save)
        except Exception as e:  # noqa: BLE001 - a damaged file must never stop a job
            log.warning("metrics counters of %s: %s", self.path, e)

    def job_finished(self, queue: Optional[str], outcome: str, started: Optional[float], save: bool = True) -> None:
        try:
            self._job_finished(queue or UNKNOWN_QUEUE, outcome, started, save)
        except Exception as e:  # noqa: BLE001
            log.warning("metrics counters of %s: %s", self.path, e)

    def _job_started(self, queue: str, enqueued: Optional[float], save: bool = True) -> None:
        started = self.data["jobs_started"]
        started[queue] = started.get(queue, 0) + 1
        if enqueued:
            waits = self.data["wait_seconds"]
            waits[queue] = observe(waits.get(queue), max(0.0, time.time() - float(enqueued)), WAIT_BUCKETS)
        if save:
            self.save()

    def _job_finished(self, queue: str, outcome: str, started: Optional[float], save: bool = True) -> None:
        by_outcome = self.data["jobs_finished"].setdefault(queue, {})
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
        if started:
            times = self.data["job_seconds"]
            times[queue] = observe(times.get(queue), max(0.0, time.time() - float(started)), JOB_BUCKETS)
        if save:
            self.save()

    def save(self) -> None:
        """Write the file; a failure is logged, never raised (metrics never stop a job)."""
        try:
            for name, base in self.base.items():
                live = self._live(name)
                self.data[name] = {k: base.get(k, 0) + live.get(k, 0) for k in set(base) | set(live)}
            self.data["updated"] = time.time()
            write_json_atomic(self.path, self.data)
        except Exception as e:  # noqa: BLE001
            log.warning("cannot write the metrics counters %s: %s", self.path, e)
