"""The facts `appliance status` shows, gathered once as plain data (also `status --json`)."""

from __future__ import annotations

import json
import shutil
import time
import xmlrpc.client

from appliance import supervisor
from appliance.config import Config, ConfigError, load_config
from appliance.gpus import scan_gpus
from appliance.inventory import format_cpu_list
from appliance.lifecycle import previous_plan
from appliance.jobs.table import read_table
from appliance.paths import Home
from appliance.runner.status import read_status
from appliance.store.health import store_problem
from appliance.store.server import StoreError, endpoint_url
from appliance.units import format_size


def _memory_used(slot: str, container_id: str | None = None) -> int | None:
    """Bytes in use by the slot: its cgroup, or with the docker backend its container's."""
    if container_id:
        from appliance.slot.docker_slot import container_memory_usage

        return container_memory_usage(container_id)
    try:
        from appliance.slot.cgroup import memory_usage

        return memory_usage(slot)
    except Exception:  # noqa: BLE001 - not readable here: shown as unknown
        return None


def _store_facts(home: Home, config: Config) -> dict:
    facts = {"kind": config.object_store.kind, "bucket": config.object_store.bucket}
    try:
        facts["endpoint"] = endpoint_url(config)
    except StoreError:
        pass
    problem = store_problem(home, config)
    facts["healthy"] = problem is None
    facts["problem"] = problem or ""
    return facts


def _last_rebalance(home: Home) -> dict | None:
    try:
        lines = home.events_file.read_text().strip().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _sources(home: Home) -> dict:
    """What the controller found in the credentials directory (queues/sources.py)."""
    from appliance.queues.sources import POLICY, sources_file

    try:
        data = json.loads(sources_file(home).read_text())
    except (OSError, ValueError):
        return {"policy": POLICY, "sources": [], "checked": None}
    return {"policy": data.get("policy", POLICY), "sources": data.get("sources", []),
            "checked": data.get("time")}


def _serving(home: Home, slot: str, pid) -> dict | None:
    """{source: [queues]} this slot's runner serves now (None if it has not said)."""
    from appliance.queues.sources import serving_file

    try:
        data = json.loads(serving_file(home, slot).read_text())
    except (OSError, ValueError):
        return None
    return data.get("sources")


def _containers(home: Home, config: Config) -> dict[str, str]:
    if config.isolation.backend != "docker":
        return {}
    try:
        from appliance.slot.docker_slot import list_slot_containers

        return {c["slot"]: c["id"] for c in list_slot_containers(str(home.root))}
    except Exception:  # noqa: BLE001 - docker down: `doctor` says why
        return {}


def gather(home: Home) -> dict:
    try:
        config = load_config(home.config_file)
        config_problem = ""
    except ConfigError as e:
        config, config_problem = Config(), str(e)
    plan = previous_plan(home)
    running = supervisor.is_running(home)
    try:
        procs = supervisor.processes(home) if running else {}
    except (OSError, xmlrpc.client.Fault):
        procs = {}
    containers = _containers(home, config)
    now = time.time()
    slots = []
    for slot in plan.slots if plan else ():
        info = procs.get(slot.name)
        state = info.state if info else "STOPPED"
        runner = read_status(home, slot.name) or {}
        if runner and info and runner.get("pid") not in (info.pid, None) and config.isolation.backend == "process":
            runner = {}  # left behind by an earlier runner of this slot
        slots.append({
            "name": slot.name,
            "kind": slot.kind,
            "state": state,
            "pid": info.pid if info and info.pid else None,
            "uptime_s": round(now - info.started) if info and state == "RUNNING" else None,
            "cpus": list(slot.cpus),
            "cpu_list": format_cpu_list(slot.cpus),
            "mems": list(slot.mems),
            "memory_bytes": slot.memory_bytes,
            "memory_used_bytes": (_memory_used(slot.name, containers.get(slot.name))
                                  if state == "RUNNING" else None),
            "shm_bytes": slot.shm_bytes,
            "gpus": list(slot.gpus),
            "gpu_indexes": list(slot.gpu_indexes),
            "gpu_memory_bytes": slot.gpu_memory_bytes,
            "gpu_share": slot.gpu_share,
            "mig": slot.mig,
            "container_id": containers.get(slot.name),
            "runner_state": runner.get("step") or runner.get("state"),
            "experiment": runner.get("experiment"),
            "owner_uid": runner.get("owner_uid"),  # who submitted it (the kernel's word), None: unknown
            "queue": runner.get("queue"),
            "job_started": runner.get("started"),
            "output": runner.get("output"),  # the job's local output file while it runs
            "last_upload": runner.get("last_upload"),
            "last_result": runner.get("last_result"),
            "gpu_use": runner.get("gpu"),
            "gpu_held": runner.get("gpu_held"),
            "gpu_note": runner.get("gpu_note"),
            "held": runner.get("held"),  # a finished job waiting for disk space to be recorded
            "serves": _serving(home, slot.name, info.pid if info else None),
        })
    scan = scan_gpus()
    return {
        "home": str(home.root),
        "config_problem": config_problem,
        "running": running,
        "supervisord_pid": supervisor.supervisord_pid(home),
        "backend": config.isolation.backend,
        "slots": slots,
        "reserved_cpus": list(plan.reserved_cpus) if plan else [],
        "reserved_memory_bytes": plan.reserved_memory if plan else 0,
        "plan_notes": list(plan.notes) if plan else [],
        "store": _store_facts(home, config) if running or config.object_store.kind == "external" else
                 {"kind": config.object_store.kind, "healthy": False, "problem": "appliance is not running"},
        "gpus": {"devices": [{"index": g.index, "uuid": g.uuid, "name": g.name, "memory_bytes": g.memory_bytes,
                              "healthy": g.healthy, "problem": g.problem, "mig_enabled": g.mig_enabled,
                              "mig_devices": [{"uuid": m.uuid, "memory_bytes": m.memory_bytes}
                                              for m in g.mig_devices]} for g in scan.gpus],
                 "problem": scan.problem},
        "queues": {"root": str(home.queue_root), "studioml_home": str(home.studioml_home),
                   "credentials_dir": config.queues.credentials_dir or str(home.credentials_dir)},
        "last_rebalance": _last_rebalance(home),
        **_job_counts(home),
        "disk_problem": disk_problem(home),
        "sources": _sources(home),
        **_queue_rows(home, config),
    }


def _job_counts(home: Home) -> dict:
    """Jobs waiting and running, and those that ended in the last hour: one open of the table."""
    hour_ago = time.time() - 3600
    active, ended = read_table(home, lambda t: (t.counts(), t.finished_since(hour_ago))) or (None, None)
    return {"jobs": active, "finished_last_hour": ended}


DISK_LOW_BYTES = 1 << 20


def disk_problem(home: Home) -> str:
    """One line when the home's disk is (all but) full, else "": runners hold finished jobs
    until space returns, and a status file may be behind while it is so."""
    try:
        free = shutil.disk_usage(home.root).free
    except OSError:
        return ""
    if free >= DISK_LOW_BYTES:
        return ""
    return (f"disk full: {home.root} has {free // 1024} KiB free; runners hold finished jobs (never run "
            f"again) and wait to record them until space returns; free space there (df -h {home.root})")


def _queue_rows(home: Home, config) -> dict:
    """Every queue of every source with its depth (appliance/queues/depths.py)."""
    from appliance.queues.depths import queue_table

    try:
        return {"queue_rows": queue_table(home, config), "queue_problem": ""}
    except PermissionError:
        return {"queue_rows": [], "queue_problem": "the local queue is not readable by you (join the appliance group)"}
    except Exception as e:  # noqa: BLE001 - a status shows the problem and goes on
        return {"queue_rows": [], "queue_problem": f"{type(e).__name__}: {e}"}


def queue_row_text(r: dict) -> str:
    """`local/local_appliance: 2 waiting, 1 running, 0 dead` (or why its depth is unknown)."""
    where = r["source"] + (f"/{r['queue']}" if r["queue"] != "-" else "")
    if r["waiting"] is None and r.get("problem"):
        return f"{where}: {r['problem']}"

    def n(v):
        return "-" if v is None else str(v)

    return f"{where}: {n(r['waiting'])} waiting, {n(r['running'])} running, {n(r['dead'])} dead"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def slot_gpu_text(s: dict) -> str:
    """A slot's GPUs for a table: "0,2 80GiB", "1 1/2 40GiB" (a share), "3 MIG 9.5GiB"."""
    if not s["gpu_indexes"]:
        return "-"
    text = ",".join(map(str, s["gpu_indexes"]))
    if s.get("mig"):
        text += " MIG"
    if s.get("gpu_share", 1) > 1:
        text += f" 1/{s['gpu_share']}"
    return text + (f" {format_size(s['gpu_memory_bytes'])}" if s.get("gpu_memory_bytes") else "")


def mig_text(devices: list) -> str:
    return ", ".join(f"{m['uuid']} {format_size(m['memory_bytes'])}" for m in devices) or "no MIG device"


def _gpu_lines(s: dict) -> list[str]:
    """What the slot's runner says about its GPUs: held back (and by whom), the running job's
    use, the last job's, or why they are not watched."""
    out = [f"HELD: {s['held']}"] if s.get("held") else []
    held = s.get("gpu_held")
    if held:
        since = f" (since {time.strftime('%H:%M:%S', time.localtime(held['since']))})" if held.get("since") else ""
        out.append(f"HELD: {held.get('reason')}{since}; its jobs wait until that is gone")
    running = s.get("experiment") and s.get("gpu_use")
    use = running or (not s.get("experiment") and (s.get("last_result") or {}).get("gpu"))
    if use:
        util = use.get("util_mean_pct")
        now = f"gpu memory {format_size(use.get('memory_bytes') or 0)} (peak " if running \
            else "last job's gpu memory: peak "
        out.append(f"{now}{format_size(use.get('peak_memory_bytes') or 0)}"
                   f"{')' if running else ''} of a {format_size(use.get('share_bytes') or 0)} share, mean "
                   f"utilisation {'-' if util is None else f'{util:g}%'}"
                   + ("; NVML could not say the memory of some of its processes" if use.get("memory_unknown") else ""))
    if s.get("gpu_note") and not held:
        out.append(f"gpu: {s['gpu_note']}")
    return out


def format_status(facts: dict) -> str:
    lines = [f"appliance at {facts['home']}: " +
             (f"running (supervisord pid {facts['supervisord_pid']})" if facts["running"] else "not running"),
             ]
    if facts["config_problem"]:
        lines.append(f"  config problem: {facts['config_problem']}")
    if facts.get("disk_problem"):
        lines.append(f"  {facts['disk_problem']}")
    header = (f"  {'SLOT':<8} {'STATE':<9} {'PID':>7} {'CPUS':<8} {'MEMORY (used/limit)':<20} {'SHM':<8} "
              f"{'GPU (memory each)':<18} {'UPTIME':>7}  JOB")
    lines += ["", header]
    for s in facts["slots"]:
        used = s["memory_used_bytes"]
        memory = f"{format_size(used) if used is not None else '-'}/{format_size(s['memory_bytes'])}"
        gpu = slot_gpu_text(s)
        job = s["experiment"] or (s["runner_state"] or "-")
        if s["experiment"]:
            job = f"{s['experiment']} ({s['runner_state']}, queue {s['queue']})"
        elif s["last_result"]:
            r = s["last_result"]
            job = f"{s['runner_state'] or 'idle'}; last: {r.get('experiment')} {r.get('outcome')}"
            if r.get("class"):
                job += f" [{r['class']}]"
        lines.append(f"  {s['name']:<8} {s['state']:<9} {s['pid'] or '-':>7} {s['cpu_list']:<8} "
                     f"{memory:<20} {format_size(s['shm_bytes']):<8} {gpu:<18} {_age(s['uptime_s']):>7}  {job}")
        if s["container_id"]:
            lines.append(f"  {'':<8} container {s['container_id'][:12]}")
        lines += [f"  {'':<8} {line}" for line in _gpu_lines(s)]
    if not facts["slots"]:
        lines.append("  (no plan yet: run `appliance up`)")
    lines.append(f"  reserved for the OS: CPUs {format_cpu_list(facts['reserved_cpus']) or 'none'}, "
                 f"{format_size(facts['reserved_memory_bytes'])} memory")
    for note in facts["plan_notes"]:
        lines.append(f"  note: {note}")
    store = facts["store"]
    lines += ["", f"store: {store['kind']} at {store.get('endpoint', '-')} bucket {store.get('bucket', '-')}: "
                  + ("healthy" if store["healthy"] else f"NOT healthy: {store['problem']}")]
    gpus = facts["gpus"]
    if gpus["devices"]:
        lines.append("gpus:")
        for g in gpus["devices"]:
            lines.append(f"  {g['index']} {g['uuid']} {g['name']} {format_size(g['memory_bytes'])}"
                         + ("" if g["healthy"] else f" UNHEALTHY: {g['problem']}")
                         + (f" MIG: {mig_text(g['mig_devices'])}" if g.get("mig_enabled") else ""))
    else:
        lines.append(f"gpus: none ({gpus['problem'] or 'NVML lists no GPU'})")
    q = facts["queues"]
    lines.append(f"queues: local root {q['root']} (STUDIOML_HOME={q['studioml_home']}); "
                 f"credentials in {q['credentials_dir']}")
    for r in facts.get("queue_rows") or []:
        lines.append(f"  {queue_row_text(r)}")
    jobs = facts.get("jobs")
    if jobs:
        lines.append(f"jobs: {jobs['queued']} queued, {jobs['held']} held, {jobs['running']} running "
                     "(`appliance jobs` lists them, where each waits and why)")
    ended = facts.get("finished_last_hour")
    if ended:  # a slot's row shows only its last result: these are all of them
        lines.append(f"  in the last hour: {ended['done']} done, {ended['failed']} failed, {ended['cancelled']} "
                     "cancelled (`appliance history` lists them)")
    if facts.get("queue_problem"):
        lines.append(f"  {facts['queue_problem']}")
    src = facts.get("sources") or {}
    if src.get("sources"):
        lines.append(f"queue sources ({src.get('policy')}):")
        for r in src["sources"]:
            what = ", ".join(r.get("queues") or []) or "no queues yet"
            state = "ok" if r.get("state") == "ok" else f"BROKEN: {r.get('reason')}"
            entry = f" [{r['entry']}]" if r.get("entry") else ""
            lines.append(f"  {r['name']}{entry}: {state}; {what}")
    serving = [s for s in facts["slots"] if s.get("serves")]
    for s in serving:
        parts = [f"{name} ({', '.join(qs) or '-'})" for name, qs in sorted(s["serves"].items())]
        lines.append(f"  {s['name']} serves: {'; '.join(parts)}")
    if facts["last_rebalance"]:
        r = facts["last_rebalance"]
        lines.append(f"last rebalance: {r.get('time_text', '')} cause {r.get('cause')}: "
                     f"added {r.get('added')}, changed {r.get('changed')}, drained {r.get('removed')}")
    return "\n".join(lines)
