"""Prometheus metrics: the controller serves `GET /metrics` on `metrics.listen` (127.0.0.1:9464).

One piece, a little over 400 lines: every family a scrape yields, read from files in one pass;
the slow parts are metrics_sampler.py's.

A scrape never waits for anything slow. It reads files only: the plan, the runners' status
files and counters files (runner/counters.py), the slots' cgroup files, the controller's
`sources.json` and `events.jsonl`; plus what the sampler thread last found. The sampler asks
the slow parts (queue brokers, the store, NVML) at most every SAMPLE_EVERY_S seconds.

A port already taken is logged once and written to `run/metrics.json` (`appliance doctor`
shows it); the controller goes on and tries the port again every RETRY_BIND_S seconds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from appliance import metrics_http
from appliance.files import write_atomic
from appliance.inventory import format_cpu_list
from appliance.jobs.table import active_counts
from appliance.lifecycle import previous_plan
from appliance.paths import Home
from appliance.metrics_sampler import Sampler
from appliance.runner.status import STATES

log = logging.getLogger("appliance.metrics")

RETRY_BIND_S = 30.0
BUSY_STATES = ("fetching", "preparing", "running", "uploading", "draining")


def state_file(home: Home) -> Path:
    """`run/metrics.json`: where the controller serves metrics, or why it cannot."""
    return home.run_dir / "metrics.json"


def parse_listen(listen: str) -> Optional[tuple[str, int]]:
    """(host, port) of a `metrics.listen` value (config.py checked it); None when off."""
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def cause_kind(event: dict) -> Optional[str]:
    """What made a re-plan, as a label value; None for events that are not re-plans."""
    if "sources" in event:  # queue sources changed: logged, but no slot moves
        return None
    kind = event.get("kind")
    if kind:
        return str(kind)
    cause = str(event.get("cause", ""))
    if cause.startswith("config changed"):
        return "config"
    if cause == "controller started":
        return "startup"
    return "gpus" if "GPU" in cause or "NVML" in cause else "other"


def label_value(text: str) -> str:
    """An outcome such as "out of memory" as a label value: out_of_memory."""
    return re.sub(r"\W+", "_", str(text)).strip("_") or "unknown"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid) -> bool:
    return isinstance(pid, int) and pid > 0 and os.path.exists(f"/proc/{pid}")


# ---------------------------------------------------------------- the scrape


class _Events:
    """Re-plans by cause, read from events.jsonl as it grows (from the start after a rotation)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.counts = path, 0, {}
        self.lock = threading.Lock()

    def read(self) -> dict:
        with self.lock:
            try:
                size = self.path.stat().st_size
            except OSError:
                return dict(self.counts)
            if size < self.offset:
                self.offset, self.counts = 0, {}
            if size > self.offset:
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    chunk = f.read(size - self.offset)
                end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next scrape
                self.offset += end
                for line in chunk[:end].splitlines():
                    try:
                        kind = cause_kind(json.loads(line))
                    except ValueError:
                        continue
                    if kind:
                        self.counts[kind] = self.counts.get(kind, 0) + 1
            return dict(self.counts)


def _histogram(name: str, doc: str, labels: list, per_label: list) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, hist in per_label:
        try:
            buckets = [(repr(float(le)), int(c)) for le, c in zip(hist["le"], hist["counts"])]
            family.add_metric(values, buckets + [("+Inf", int(hist["count"]))], float(hist["sum"]))
        except (KeyError, TypeError, ValueError):
            continue
    return family


class Collector:
    """Everything /metrics shows, gathered at scrape time from files and the sampler's last look."""

    def __init__(self, home: Home, sampler: Optional[Sampler] = None, backend: str = "process"):
        self.home, self.sampler, self.backend = home, sampler, backend
        self.events = _Events(home.events_file)

    def _jobs(self):
        counts = active_counts(self.home)
        if counts is not None:
            jobs = GaugeMetricFamily("appliance_jobs", "Jobs of this box by state, from the job table "
                                     "(queued, held, running)", labels=["state"])
            for state, n in counts.items():
                jobs.add_metric([state], n)
            yield jobs

    def collect(self):
        plan = previous_plan(self.home)
        slots = list(plan.slots) if plan else []
        yield from self._slots(slots)
        yield from self._runner_counters()
        yield from self._queues()
        yield from self._jobs()
        rebalances = CounterMetricFamily("appliance_rebalances", "Re-plans of the slots, by what caused them "
                                         "(gpus, config, startup, other)", labels=["cause"])
        for kind, n in sorted(self.events.read().items()):
            rebalances.add_metric([kind], n)
        yield rebalances
        yield from self._sampled(slots)

    def _slots(self, slots):
        info = GaugeMetricFamily("appliance_slot_info", "A slot of the applied plan (always 1)",
                                 labels=["slot", "kind", "cpus", "gpus"])
        state = GaugeMetricFamily("appliance_slot_state", "1 for the state the slot's runner is in",
                                  labels=["slot", "state"])
        limit = GaugeMetricFamily("appliance_slot_memory_limit_bytes", "Memory limit of the slot",
                                  labels=["slot"])
        used = GaugeMetricFamily("appliance_slot_memory_used_bytes", "Memory charged to the slot's cgroup",
                                 labels=["slot"])
        cpu = CounterMetricFamily("appliance_slot_cpu_seconds", "CPU time used by the slot's cgroup",
                                  labels=["slot"])
        from appliance.runner.status import read_status
        from appliance.slot import cgroup

        for slot in slots:
            info.add_metric([slot.name, slot.kind, format_cpu_list(slot.cpus),
                             ",".join(map(str, slot.gpu_indexes))], 1)
            limit.add_metric([slot.name], slot.memory_bytes)
            status = read_status(self.home, slot.name) or {}
            # a status whose runner is gone is stale (docker: its pid is the container's own)
            now = status.get("state") if self.backend != "process" or _alive(status.get("pid")) else None
            for s in STATES:
                state.add_metric([slot.name, s], 1 if s == (now or "stopped") else 0)
            if self.backend == "process":
                memory = cgroup.memory_usage(slot.name)
                if memory is not None:
                    used.add_metric([slot.name], memory)
                seconds = cgroup.cpu_seconds(slot.name)
                if seconds is not None:
                    cpu.add_metric([slot.name], seconds)
        yield from (info, state, limit, used, cpu)

    def _runner_counters(self):
        from appliance.runner.counters import read_counters

        started = CounterMetricFamily("appliance_jobs_started", "Jobs a runner started, by slot and queue",
                                      labels=["slot", "queue"])
        finished = CounterMetricFamily("appliance_jobs_finished", "Jobs that ended, by slot, queue and outcome "
                                       "(success, failed, out_of_memory, timed_out, environment_failed, "
                                       "released, interrupted)",
                                       labels=["slot", "queue", "outcome"])
        simple = {  # (section, key): family
            ("env_cache", "hits"): CounterMetricFamily(
                "appliance_env_cache_hits", "Jobs that found their Python environment built", labels=["slot"]),
            ("env_cache", "misses"): CounterMetricFamily(
                "appliance_env_cache_misses", "Python environments built for a job", labels=["slot"]),
            ("env_cache", "build_failures"): CounterMetricFamily(
                "appliance_env_cache_build_failures", "Python environment builds that failed", labels=["slot"]),
            ("env_cache", "build_seconds"): CounterMetricFamily(
                "appliance_env_cache_build_seconds", "Time spent building Python environments", labels=["slot"]),
            ("artifact_cache", "hits"): CounterMetricFamily(
                "appliance_artifact_cache_hits", "Immutable artifacts found in the cache", labels=["slot"]),
            ("artifact_cache", "misses"): CounterMetricFamily(
                "appliance_artifact_cache_misses", "Immutable artifacts downloaded into the cache", labels=["slot"]),
            ("artifact_cache", "hit_bytes"): CounterMetricFamily(
                "appliance_artifact_cache_hit_bytes", "Bytes served from the artifact cache", labels=["slot"]),
            ("artifact_cache", "miss_bytes"): CounterMetricFamily(
                "appliance_artifact_cache_miss_bytes", "Bytes downloaded into the artifact cache", labels=["slot"]),
        }
        errors = CounterMetricFamily("appliance_store_request_errors", "Failed requests of runners to the store "
                                     "(unavailable, access_denied, other)", labels=["slot", "kind"])
        durations, waits = [], []
        folder = self.home.status_dir / "metrics"
        paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
        for path in paths:
            data = read_counters(self.home, path.stem)
            if not data:
                continue
            slot = path.stem
            for queue, n in sorted((data.get("jobs_started") or {}).items()):
                started.add_metric([slot, queue], n)
            for queue, outcomes in sorted((data.get("jobs_finished") or {}).items()):
                for outcome, n in sorted(outcomes.items()):
                    finished.add_metric([slot, queue, label_value(outcome)], n)
            for (section, key), family in simple.items():
                family.add_metric([slot], (data.get(section) or {}).get(key, 0))
            for kind, n in sorted((data.get("store_errors") or {}).items()):
                errors.add_metric([slot, kind], n)
            durations += [([slot, q], h) for q, h in sorted((data.get("job_seconds") or {}).items())]
            waits += [([slot, q], h) for q, h in sorted((data.get("wait_seconds") or {}).items())]
        yield started
        yield finished
        yield _histogram("appliance_job_duration_seconds", "Time from a job's start (claim) to its end",
                         ["slot", "queue"], durations)
        yield _histogram("appliance_job_wait_seconds", "Time from a request's submission to its start",
                         ["slot", "queue"], waits)
        yield from simple.values()
        yield errors

    def _queues(self):
        from appliance.queues.sources import sources_file

        up = GaugeMetricFamily("appliance_queue_source_up", "1 when the controller's last check of the queue "
                               "source passed (see `appliance status`)", labels=["source", "kind"])
        data = _read_json(sources_file(self.home)) or {}
        for row in data.get("sources", []):
            up.add_metric([str(row.get("name")), str(row.get("kind"))], 1 if row.get("state") == "ok" else 0)
        yield up

    def _sampled(self, slots):
        latest = self.sampler.latest if self.sampler else {}
        depth = GaugeMetricFamily("appliance_queue_messages", "Messages per queue and state "
                                  "(waiting, running, dead), sampled every 15 s", labels=["source", "queue", "state"])
        for source, queue, state, n in latest.get("queues", []):
            depth.add_metric([source, queue, state], n)
        yield depth
        sampled = GaugeMetricFamily("appliance_queue_depth_up", "1 when the last look at the source's queue "
                                    "depths worked", labels=["source"])
        for source, ok in sorted(latest.get("queue_sampled", {}).items()):
            sampled.add_metric([source], ok)
        yield sampled
        if latest.get("store_up") is not None:
            yield GaugeMetricFamily("appliance_store_up", "1 when the object store answers with the appliance's "
                                    "credentials, has its bucket and takes a write", value=latest["store_up"])
            problem = GaugeMetricFamily("appliance_store_problem", "1 with what is wrong with the store "
                                        "(e.g. 'store cannot write: disk full ...') while it is", labels=["problem"])
            if latest.get("store_problem"):
                problem.add_metric([latest["store_problem"]], 1)
            yield problem
        if "artifact_cache_bytes" in latest:
            yield GaugeMetricFamily("appliance_artifact_cache_size_bytes", "Bytes held by the artifact cache",
                                    value=latest["artifact_cache_bytes"])
        by_uuid = {uuid: s.name for s in slots for uuid in s.gpus}
        busy = GaugeMetricFamily("appliance_gpu_utilization_ratio", "Fraction of the last sample period the GPU "
                                 "was busy (NVML)", labels=["gpu", "uuid", "slot"])
        memory = GaugeMetricFamily("appliance_gpu_memory_used_bytes", "GPU memory in use (NVML)",
                                   labels=["gpu", "uuid", "slot"])
        total = GaugeMetricFamily("appliance_gpu_memory_total_bytes", "GPU memory (NVML)",
                                  labels=["gpu", "uuid", "slot"])
        for g in latest.get("gpus", []):
            if g.problem:
                continue
            labels = [str(g.index), g.uuid, by_uuid.get(g.uuid, "")]
            if g.utilization is not None:
                busy.add_metric(labels, g.utilization / 100.0)
            if g.memory_used_bytes is not None:
                memory.add_metric(labels, g.memory_used_bytes)
                total.add_metric(labels, g.memory_total_bytes)
        yield from (busy, memory, total)
        if latest.get("time"):
            yield GaugeMetricFamily("appliance_metrics_sampled_timestamp_seconds", "When queue depths, the store "
                                    "and GPUs were last sampled", value=latest["time"])


# ---------------------------------------------------------------- the server


class MetricsServer:
    """The /metrics endpoint of the controller: `start()` never raises; `ensure()` (called
    every controller tick) retries a taken port and follows a changed `metrics.listen`."""

    def __init__(self, home: Home, config):
        self.home, self.config = home, config
        self.listen = ""
        self.httpd = None
        self.error = ""
        self.next_try = 0.0
        self.sampler: Optional[Sampler] = None

    @property
    def serving(self) -> bool:
        return self.httpd is not None

    def ensure(self, config) -> None:
        self.config = config
        if self.sampler is not None:
            self.sampler.config = config
        if config.metrics.listen != self.listen:
            self.stop()
            self.listen = config.metrics.listen
            self.error = ""
            self.next_try = 0.0
            if not self.listen:
                log.info("metrics off (metrics.listen is empty)")
                if self.sampler is not None:
                    self.sampler.stop()
                    self.sampler = None
                self._record()
        if self.listen and not self.serving and time.monotonic() >= self.next_try:
            try:
                self._start()
            except Exception:  # noqa: BLE001 - metrics must never stop the controller
                log.exception("starting the metrics server failed; trying again in %.0fs", RETRY_BIND_S)

    def _start(self) -> None:
        host, port = parse_listen(self.listen)
        self.next_try = time.monotonic() + RETRY_BIND_S
        if self.sampler is None:
            self.sampler = Sampler(self.home, self.config)  # started once someone can scrape
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(self.home, self.sampler, self.config.isolation.backend))
        try:
            self.httpd = metrics_http.serve(host, port, registry)
        except OSError as e:
            why = "the port is in use by another program" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            error = (f"cannot serve metrics on {self.listen}: {why}; free it or choose another port with "
                     f"`appliance config set metrics.listen 127.0.0.1:PORT` (\"\" turns metrics off)")
            if error != self.error:
                log.error("%s (the controller carries on; trying again every %.0fs)", error, RETRY_BIND_S)
            self.error = error
            self._record()
            return
        self.error = ""
        if not self.sampler.started:
            self.sampler.start()
        log.info("metrics at http://%s/metrics", self.listen)
        self._record()

    def _record(self) -> None:
        try:
            write_atomic(state_file(self.home), json.dumps({
                "listen": self.listen, "serving": self.serving, "error": self.error,
                "pid": os.getpid(), "time": time.time()}) + "\n")
        except OSError as e:
            log.warning("cannot write %s: %s", state_file(self.home), e)

    def stop(self) -> None:
        if self.httpd is not None:
            metrics_http.stop(self.httpd)
            self.httpd = None

    def close(self) -> None:
        self.stop()
        if self.sampler is not None:
            self.sampler.stop()


def doctor_finding(home: Home, config, running: bool):
    """(ok, detail) for `appliance doctor`'s metrics row."""
    listen = config.metrics.listen
    if not listen:
        return True, 'off (metrics.listen = "")'
    state = _read_json(state_file(home)) if running else None
    if state and state.get("listen") == listen and _alive(state.get("pid")):
        if state.get("error"):
            return False, state["error"]
        return True, f"http://{listen}/metrics"
    if running:
        return True, f"{listen}: the controller has not started serving yet"
    import socket

    host, port = parse_listen(listen)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            return False, (f"{listen} is taken ({e.strerror}): metrics will not be served; free it or "
                           f"`appliance config set metrics.listen 127.0.0.1:PORT`")
    return True, f"{listen} free (served by the controller after `appliance up`)"
