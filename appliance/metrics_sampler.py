"""The slow parts of /metrics, asked in a thread of their own: every queue source's depth, the
store (with a write at most every STORE_WRITE_EVERY_S while it is well), NVML's GPU use and the
artifact cache's size, at most every SAMPLE_EVERY_S seconds. A scrape (metrics.py) reads what
the sampler found last and never waits for any of them.

While nothing scrapes (for UNWATCHED_AFTER_S), they are asked only every UNWATCHED_EVERY_S: an
appliance nobody watches does not wake its store and brokers four times a minute. The next
scrape wakes the sampler at once; that one scrape gets the older sample (its time is
`appliance_metrics_sampled_timestamp_seconds`), the following ones fresh samples.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

from appliance.paths import Home
from appliance.queues.depths import sample_depths

log = logging.getLogger("appliance.metrics")

SAMPLE_EVERY_S = 15.0  # brokers' management APIs, the store and NVML: no more often than this
UNWATCHED_AFTER_S = 120.0  # no scrape this long (two of Prometheus' default intervals): nobody watches...
UNWATCHED_EVERY_S = 300.0  # ...and the slow parts are asked this often
STORE_WRITE_EVERY_S = 60.0  # the store's write probe: no more often than this


class Sampler:
    """Asks the slow parts every SAMPLE_EVERY_S seconds in its own thread; `latest` is what
    it found last (a dict replaced whole, so a scrape reads it without a lock)."""

    def __init__(self, home: Home, config, every_s: float = SAMPLE_EVERY_S):
        self.home, self.config, self.every_s = home, config, every_s
        self._latest: dict = {}
        self._read_at = time.monotonic()  # when a scrape last read `latest`
        self._slow = False  # asking every UNWATCHED_EVERY_S: nobody scrapes
        self._store_wrote: Optional[float] = None  # when the store last took the write probe
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def latest(self) -> dict:
        """What the sampler found last. Reading it is a scrape: it keeps the sampler at every_s,
        and wakes one that slowed down for want of scrapes."""
        self._read_at = time.monotonic()
        if self._slow:
            self._slow = False
            self._wake.set()
        return self._latest

    @latest.setter
    def latest(self, value: dict) -> None:
        self._latest = value

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._latest = self.sample()
            except Exception:  # noqa: BLE001 - a surprise must not end the thread
                log.exception("metrics sampler failed; trying again")
            self._slow = time.monotonic() - self._read_at >= UNWATCHED_AFTER_S
            self._wake.wait(UNWATCHED_EVERY_S if self._slow else self.every_s)
            self._wake.clear()

    def sample(self) -> dict:
        rows, sampled = sample_depths(self.home, self.config)
        out: dict = {"time": time.time(), "queues": rows, "queue_sampled": sampled}
        out["store_up"], out["store_problem"] = self._store_up()
        from appliance.gpus import gpu_usage

        out["gpus"] = gpu_usage()
        out["artifact_cache_bytes"] = _dir_blobs(self.home.artifact_cache)
        return out

    def _store_up(self) -> tuple[int, str]:
        from appliance.store.health import store_problem

        # a write (put and delete) at most every STORE_WRITE_EVERY_S while the store is well: each
        # one wakes the whole store; a full disk shows at every sample all the same (its free
        # space is looked at), and a store that failed is probed with a write until it takes one
        write = (self._store_wrote is None or self._latest.get("store_up") == 0
                 or time.monotonic() - self._store_wrote >= STORE_WRITE_EVERY_S)
        problem = store_problem(self.home, self.config, write=write)
        if write:
            self._store_wrote = time.monotonic()
        if problem and self._latest.get("store_up") == 1:
            log.warning("metrics: the store stopped answering: %s", problem)
        return (0, problem) if problem else (1, "")


def _dir_blobs(root: Path) -> int:
    total = 0
    try:
        with os.scandir(root) as it:
            for e in it:
                if e.name.endswith(".blob"):
                    try:
                        total += e.stat().st_size
                    except OSError:
                        pass
    except OSError:
        pass
    return total
