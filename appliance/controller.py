"""The controller: follows the box and the queues while the appliance runs.

`python -m appliance.controller --home HOME` runs as supervisord's `controller` program.

- Credentials directory (inotify, debounced by `controller.debounce`; an editor's atomic save
  arrives as a move): every entry is checked (parsed, connected to, its queues listed) and the
  result written to `run/sources.json` for `appliance status`. Slots are not touched: under the
  sharing policy every slot serves every source, and runners pick up new and removed entries by
  themselves within a fraction of a second (queues/sources.py).
- GPUs (NVML, every `gpus.poll_interval`) and appliance.toml (inotify): on a change the plan
  is made again from the previous one (slots whose resources remain keep them), supervisord.conf
  and plan.json re-rendered, and only the difference applied over XML-RPC: slots to remove or
  change are stopped without waiting (SIGTERM: the runner drains, finishing its job within
  `runner.drain_timeout`), removed once stopped, and new or changed slots are added as soon as
  no draining slot still holds their CPUs or GPUs. Unchanged slots keep their PIDs and jobs.
  While NVML fails, the last good GPU list stands (3 failed polls in a row count as "no GPUs").
- Every re-plan is one JSON line in `events.jsonl`: time, cause, added, changed, removed.

Nothing here blocks for long: a drain of many minutes goes on while the controller keeps
watching. supervisord unreachable (restarting) is logged once and retried every tick.
At rest it sleeps until a watched file changes, the next GPU poll, or a slow fallback check
(credentials, supervisord.conf against what runs): nothing else wakes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Callable, Optional

from appliance import notify, supervisor
from appliance.config import Config, ConfigError, load_config
from appliance.files import write_atomic
from appliance.gpus import GpuScan, scan_gpus
from appliance.inventory import take_inventory
from appliance.lifecycle import previous_plan, remove_slot_cgroup
from appliance.metrics import MetricsServer
from appliance.controller_watch import Watch
from appliance.paths import Home
from appliance.plan import PlanError, diff_plans, make_plan
from appliance.queues import sources as qsources
from appliance.render import write_supervisord

log = logging.getLogger("appliance.controller")

TICK_S = 0.1
IDLE_WAIT_S = 60.0  # the longest sleep of an idle loop
RECONCILE_EVERY_S = 60.0  # supervisord asked at rest (and at once when supervisord.conf changes)
CREDS_CHECK_S = 30.0  # the credentials directory looked at, beside its watch (2 s without inotify)
NVML_FAILURES_BEFORE_GIVING_UP = 3  # failed polls in a row, and at least NVML_GRACE_S long,
NVML_GRACE_S = 30.0  # before a failing NVML counts as "no GPUs" (their slots drain)
RPC_ERRORS = (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError)
STOPPED_STATES = ("STOPPED", "EXITED", "FATAL", "UNKNOWN")


def _gpu_key(scan: GpuScan) -> tuple:
    """What of a scan the plan depends on: a GPU coming or going, its health, its MIG layout."""
    return tuple((g.index, g.uuid, g.healthy, g.problem, g.mig_enabled,
                  tuple((m.uuid, m.memory_bytes) for m in g.mig_devices)) for g in scan.gpus)


def describe_gpu_change(old: Optional[GpuScan], new: GpuScan) -> str:
    """One line saying what happened to the GPUs between two scans."""
    before = {g.uuid: g for g in (old.gpus if old else ())}
    after = {g.uuid: g for g in new.gpus}
    parts = []
    for uuid, g in before.items():
        if uuid not in after:
            parts.append(f"GPU {g.index} ({uuid}) lost")
        elif g.healthy and not after[uuid].healthy:
            parts.append(f"GPU {after[uuid].index} ({uuid}) unhealthy: {after[uuid].problem}")
        elif not g.healthy and after[uuid].healthy:
            parts.append(f"GPU {after[uuid].index} ({uuid}) healthy again")
    for uuid, g in after.items():
        was = before.get(uuid)
        if was is not None and (was.mig_enabled, was.mig_devices) != (g.mig_enabled, g.mig_devices):
            if was.mig_enabled != g.mig_enabled:
                parts.append(f"GPU {g.index} ({uuid}) MIG mode {'on' if g.mig_enabled else 'off'}")
            old_mig = {m.uuid for m in was.mig_devices}
            new_mig = {m.uuid for m in g.mig_devices}
            change = [f"+{u}" for u in sorted(new_mig - old_mig)] + [f"-{u}" for u in sorted(old_mig - new_mig)]
            if change:
                parts.append(f"GPU {g.index} ({uuid}) MIG devices changed: {' '.join(change)}")
        if uuid not in before:
            parts.append(f"GPU {g.index} ({uuid}) appeared" + ("" if g.healthy else f", unhealthy: {g.problem}"))
    if new.problem and not new.gpus:
        parts.append(new.problem)
    return "; ".join(parts) or "GPUs changed"


def log_event(home: Home, cause: str, added=(), changed=(), removed=(), **extra) -> dict:
    now = time.time()
    event = {"time": now, "time_text": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
             "cause": cause, "added": list(added), "changed": list(changed), "removed": list(removed),
             **extra}
    home.events_file.parent.mkdir(parents=True, exist_ok=True)
    with open(home.events_file, "a") as f:
        f.write(json.dumps(event) + "\n")
    return event


class Controller:
    def __init__(self, home: Home, scan: Callable[[], GpuScan] = scan_gpus, apply: bool = True):
        self.home = home
        self.scan = scan
        self.apply = apply  # False: plan and log only (tests without supervisord)
        self.config = self._load_config() or Config()
        self.creds = qsources.credentials_dir(home, self.config)
        self.watch = Watch(home, self.creds)
        self.stopping = False
        self.gpus: Optional[GpuScan] = None
        self.nvml_failures = 0
        self.nvml_failing_since = 0.0
        self.nvml_grace_s = NVML_GRACE_S
        self.next_poll = 0.0
        self.creds_sig: Optional[tuple] = None
        self.next_creds_check = 0.0
        self.retiring: dict = {}  # slot name -> the old Slot, while it drains
        self.pending = True  # the running programs may differ from supervisord.conf
        self.next_reconcile = 0.0
        self.conf_sig: Optional[tuple] = None  # supervisord.conf when last reconciled
        self.rpc_down_since: Optional[float] = None
        self.metrics = MetricsServer(home, self.config)  # serves once run() starts
        self.notify: Optional[notify.Deliverer] = None  # run() starts it

    # -- config

    def _load_config(self) -> Optional[Config]:
        try:
            return load_config(self.home.config_file)
        except ConfigError as e:
            log.error("%s; keeping the last good config", e)
            return None

    # -- main loop

    def run(self) -> int:
        self.watch.start()
        self.notify = notify.start(self.home)  # delivers notifications in threads of its own
        log.info("controller for %s: credentials %s, GPU poll every %.1fs, debounce %.2fs",
                 self.home.root, self.creds, self.config.gpus.poll_interval, self.config.controller.debounce)
        self.check_credentials("startup")
        while not self.stopping:
            try:
                self.metrics.ensure(self.config)  # never raises, never blocks
                self.step()
            except Exception:  # noqa: BLE001 - a bug or a surprise must not become a crash loop
                log.exception("controller step failed; carrying on")
                time.sleep(1.0)
            self.watch.wait(self.until_due())
        self.watch.stop()
        self.metrics.close()
        log.info("controller stopped")
        return 0

    def until_due(self) -> float:
        """How long the loop may sleep: until the GPU poll, the credentials check, a reconcile
        or a debounced change is due (a watched change wakes it sooner), at most IDLE_WAIT_S;
        TICK_S while slots are being changed."""
        if self.pending or self.retiring:
            return TICK_S
        due = min(self.next_poll, self.next_creds_check, self.next_reconcile,
                  self.watch.due(self.config.controller.debounce),
                  self.metrics.next_try if self.metrics.listen and not self.metrics.serving else float("inf"))
        return min(IDLE_WAIT_S, max(TICK_S, due - time.monotonic()))

    def step(self) -> None:
        now = time.monotonic()
        creds_changed, config_changed = self.watch.take(self.config.controller.debounce)
        if now >= self.next_creds_check:  # fallback for missed events
            self.next_creds_check = now + (CREDS_CHECK_S if self.watch.inotify is not None else 2.0)
            if qsources.directory_signature(self.creds) != self.creds_sig:
                creds_changed = True
        if creds_changed:
            self.check_credentials("credentials changed")
        if config_changed:
            new = self._load_config()
            if self.notify is not None:
                self.notify.poke()  # [notify] may have changed
            if new is not None and new != self.config:
                self.config = new
                if self.replan("config changed (appliance.toml)", quiet_if_same=True, kind="config") is None:
                    log.info("appliance.toml changed; no slot changes (other settings apply on `appliance up`)")
        if now >= self.next_poll:
            self.next_poll = now + self.config.gpus.poll_interval
            self.poll_gpus()
        if self.pending or self.retiring or now >= self.next_reconcile or self._conf_sig() != self.conf_sig:
            self.reconcile()

    # -- credentials

    def check_credentials(self, cause: str) -> list[dict]:
        self.creds_sig = qsources.directory_signature(self.creds)
        rows = [{"name": "local", "kind": "local", "entry": "", "state": "ok", "reason": "",
                 "queues": _local_queues(self.home)}]
        if not self.creds.is_dir():
            log.warning("credentials directory %s is missing: only the local queue is served "
                        "(make the directory to add queue sources)", self.creds)
        for entry in qsources.read_entries(self.creds):
            state, reason, queues = qsources.check_entry(entry)
            rows.append({"name": entry.source_name, "kind": entry.kind, "entry": entry.name,
                         "state": state, "reason": reason, "queues": queues})
            if state == "ok":
                log.info("%s: %s ok, queues %s", cause, entry.name, ", ".join(queues) or "(none yet)")
            else:
                log.warning("%s: %s BROKEN: %s", cause, entry.name, reason)
        previous = _read_json(qsources.sources_file(self.home)) or {}
        before = {r["name"]: r["state"] for r in previous.get("sources", [])}
        write_atomic(qsources.sources_file(self.home), json.dumps({
            "time": time.time(), "credentials_dir": str(self.creds), "policy": qsources.POLICY,
            "sources": rows}, indent=1) + "\n")
        after = {r["name"]: r["state"] for r in rows}
        notify.sources_changed(self.home, before, rows)
        if cause != "startup" and after != before:
            added = sorted(set(after) - set(before))
            gone = sorted(set(before) - set(after))
            parts = [f"+{n}" + ("" if after[n] == "ok" else " (broken)") for n in added]
            parts += [f"-{n}" for n in gone]
            parts += [f"{n} {after[n]}" for n in after if n in before and before[n] != after[n]]
            log_event(self.home, f"queue sources changed: {', '.join(parts)}",
                      sources={r["name"]: r["state"] for r in rows})
        return rows

    # -- GPUs

    def poll_gpus(self) -> None:
        try:
            scan = self.scan()
        except Exception as e:  # noqa: BLE001 - NVML may raise anything mid-poll
            scan = GpuScan((), f"NVML raised {type(e).__name__}: {e}")
        if scan.problem and self.gpus is not None and self.gpus.gpus:
            self.nvml_failures += 1
            if self.nvml_failures == 1:
                self.nvml_failing_since = time.monotonic()
            failing_for = time.monotonic() - self.nvml_failing_since
            if self.nvml_failures < NVML_FAILURES_BEFORE_GIVING_UP or failing_for < self.nvml_grace_s:
                log.warning("GPU poll failed (%s); keeping the last GPU list (failing for %.0fs, "
                            "giving up after %.0fs)", scan.problem, failing_for, self.nvml_grace_s)
                return
            log.error("GPU poll failed %d times in a row over %.0fs (%s): treating it as no GPUs",
                      self.nvml_failures, failing_for, scan.problem)
        else:
            self.nvml_failures = 0
        if self.gpus is None:
            self.gpus = scan
            # `up` planned with a scan of its own: re-plan once in case the box changed since
            self.replan("controller started", scan, quiet_if_same=True, kind="startup")
            return
        if _gpu_key(scan) != _gpu_key(self.gpus):
            cause = describe_gpu_change(self.gpus, scan)
            notify.gpus_changed(self.home, self.gpus, scan)
            self.gpus = scan
            self.replan(cause, scan)

    # -- planning

    def replan(self, cause: str, scan: Optional[GpuScan] = None, quiet_if_same: bool = False,
               kind: str = "gpus") -> Optional[dict]:
        """Plan again; `kind` (gpus, config, startup) labels the event for metrics."""
        scan = scan or self.gpus or self.scan()
        previous = previous_plan(self.home)
        try:
            plan = make_plan(self.config, take_inventory(scan), previous)
        except PlanError as e:
            log.error("re-plan after %s failed: %s; the slots stay as they are", cause, e)
            return None
        diff = diff_plans(previous, plan)
        if previous is not None and plan == previous and quiet_if_same:
            return None
        for name in diff.removed + diff.changed:
            old = previous.slot(name) if previous else None
            if old is not None:
                self.retiring.setdefault(name, old)
        try:
            write_supervisord(self.home, self.config, plan, sys.executable)
        except OSError as e:
            log.error("writing supervisord.conf: %s", e)
            return None
        self.pending = True
        event = log_event(self.home, cause, diff.added, diff.changed, diff.removed,
                          notes=list(plan.notes), kind=kind)
        log.info("re-plan (%s): added %s, changed %s, draining %s", cause, list(diff.added),
                 list(diff.changed), list(diff.removed))
        return event

    # -- applying

    def reconcile(self) -> None:
        """One non-blocking pass toward supervisord running exactly supervisord.conf."""
        self.next_reconcile = time.monotonic() + RECONCILE_EVERY_S
        self.conf_sig = self._conf_sig()
        if not self.apply:
            self.pending = False
            return
        try:
            server = supervisor.rpc(self.home)
            [[added, changed, removed]] = server.supervisor.reloadConfig()
            if self.rpc_down_since is not None:
                log.info("supervisord answers again after %.0fs", time.monotonic() - self.rpc_down_since)
                self.rpc_down_since = None
            slots = lambda names: [n for n in names if n.startswith("slot-")]  # noqa: E731
            draining = []
            for name in slots(removed) + slots(changed):
                info = server.supervisor.getProcessInfo(name)
                if info["statename"] in STOPPED_STATES:
                    server.supervisor.removeProcessGroup(name)
                    log.info("%s stopped%s", name, " (drained)" if name in self.retiring else "")
                    if name in removed:
                        self.retiring.pop(name, None)
                        problem = remove_slot_cgroup(name)
                        if problem:
                            log.warning("%s: its cgroup stays: %s", name, problem)
                    continue
                if info["statename"] != "STOPPING":
                    log.info("draining %s (pid %s): it finishes its job, then stops", name, info["pid"])
                    try:
                        server.supervisor.stopProcessGroup(name, False)
                    except xmlrpc.client.Fault as e:
                        if "NOT_RUNNING" not in e.faultString:
                            raise
                draining.append(name)
            busy_cpus, busy_gpus, unknown = set(), set(), False
            for name in draining:
                old = self.retiring.get(name)
                if old is None:
                    unknown = True
                else:
                    busy_cpus |= set(old.cpus)
                    busy_gpus |= set(old.gpu_indexes)
            plan = previous_plan(self.home)
            waiting = []
            for name in slots(added):
                new = plan.slot(name) if plan else None
                if unknown or (new is not None and (set(new.cpus) & busy_cpus or set(new.gpu_indexes) & busy_gpus)):
                    waiting.append(name)  # the slot holding its CPUs/GPU (or part of it) is still draining
                    continue
                server.supervisor.addProcessGroup(name)
                log.info("started %s", name)
            self.retiring = {n: s for n, s in self.retiring.items() if n in draining}
            self.pending = bool(draining or waiting)
        except xmlrpc.client.Fault as e:  # e.g. `appliance up` applied the same change meanwhile
            log.warning("supervisord refused a change (%s); trying again", e.faultString)
            self.pending = True
        except RPC_ERRORS as e:
            if self.rpc_down_since is None:
                self.rpc_down_since = time.monotonic()
                log.warning("supervisord not answering (%s); retrying", e)
            self.pending = True

    def _conf_sig(self) -> tuple:
        """supervisord.conf's identity: written again (by `up`, `render`, a re-plan) means apply it."""
        try:
            st = self.home.supervisord_conf.stat()
            return (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return ()

    def stop(self, *_args) -> None:
        self.stopping = True
        self.watch.wake()


def _local_queues(home: Home) -> list[str]:
    try:
        from appliance.queues.local import LocalQueueSource

        return LocalQueueSource(home.queue_root, watch=False).queues()
    except OSError:
        return []


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m appliance.controller",
                                description="re-plan slots as GPUs, config and queue credentials change")
    p.add_argument("--home", default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s controller %(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    controller = Controller(Home.at(args.home))
    signal.signal(signal.SIGTERM, controller.stop)
    signal.signal(signal.SIGINT, controller.stop)
    return controller.run()


if __name__ == "__main__":
    raise SystemExit(main())
