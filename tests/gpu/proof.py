"""The proof on a real GPU: its verdicts, its report, and NVML's answers recorded for the fake.

Pure parts (tested everywhere by tests/test_gpu_proof.py, against recorded NVML answers):
`Check` and the report (`summary`, `exit_code`, `report`), the judges (`judge_*`: facts in,
one `Check` out), `fake_description` (a recorded NVML -> the JSON tests/fake_nvml reads).
`record_nvml(pynvml)` asks NVML what appliance/gpus.py and the GPU watch ask and keeps every
answer or error code, so what the card answered can be compared with the fake's answers.
`driver_problem()` says why this box has no NVIDIA driver ('' when it has one); run as
`python3 proof.py --driver-check` it needs nothing but the standard library.
tests/gpu/drive.py runs the appliance on the card and feeds the judges.
"""

from __future__ import annotations

import ctypes
import json
import re
import sys
from dataclasses import asdict, dataclass, field

OK, NA, FAIL = "ok", "n/a", "FAIL"
GiB = 1 << 30
NO_DRIVER_LINE = "no NVIDIA driver on this box: nothing to prove here"


@dataclass
class Check:
    name: str
    status: str  # OK, NA or FAIL
    reason: str = ""  # why n/a or FAIL (for n/a: the platform's reason, not the appliance's)
    figures: dict = field(default_factory=dict)

    def line(self) -> str:
        figs = " ".join(f"{k}={_fig(v)}" for k, v in self.figures.items())
        tail = f"  [{figs}]" if figs else ""
        if self.status == OK:
            return f"ok    {self.name}{tail}"
        if self.status == FAIL:
            return f"FAIL  {self.name}: {self.reason}{tail}"
        return f"n/a: {self.reason}  ({self.name}){tail}"


def _fig(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int) and not isinstance(v, bool) and v >= GiB:
        return f"{v / GiB:.1f}GiB"
    return str(v)


def ok(name, **figures) -> Check:
    return Check(name, OK, "", figures)


def na(name, reason, **figures) -> Check:
    return Check(name, NA, reason, figures)


def fail(name, reason, **figures) -> Check:
    return Check(name, FAIL, reason, figures)


def summary(checks) -> str:
    n = {s: sum(c.status == s for c in checks) for s in (OK, NA, FAIL)}
    return f"gpu proof: {n[OK]} ok, {n[NA]} n/a, {n[FAIL]} FAIL"


def exit_code(checks) -> int:
    """1 on any FAIL (or when nothing was checked at all), else 0."""
    return 1 if not checks or any(c.status == FAIL for c in checks) else 0


def report(checks, nvml: dict, facts: dict) -> dict:
    """The JSON report: verdicts, the summary, what NVML answered, what the run saw."""
    return {"summary": summary(checks), "exit_code": exit_code(checks),
            "checks": [asdict(c) for c in checks], "nvml": nvml, "facts": facts}


# ---------------------------------------------------------------- reading NVML's answers


def answer(rec: dict, call: str, device: int = 0):
    """The value a recorded call gave on `device`, or None when it answered an error."""
    dev = device_calls(rec, device)
    got = dev.get(call) or {}
    return got.get("value")


def device_calls(rec: dict, device: int = 0) -> dict:
    devices = (rec or {}).get("devices") or []
    return devices[device]["calls"] if device < len(devices) else {}


def error_of(rec: dict, call: str, device: int = 0) -> str:
    got = device_calls(rec, device).get(call) or {}
    return got.get("error_name") or ("" if "value" in got else "not asked")


def affinity_cpus(words) -> list[int]:
    return [w * 64 + b for w, word in enumerate(words or []) for b in range(64) if (int(word) >> b) & 1]


# ---------------------------------------------------------------- the judges (pure)


def judge_inventory(rec: dict, status: dict, gpu_list: str) -> Check:
    """The controller's scan (`status --json`) and `appliance gpu list` show the card NVML shows."""
    name = "inventory: the card from NVML, in status and `appliance gpu list`"
    uuid, card = answer(rec, "nvmlDeviceGetUUID"), answer(rec, "nvmlDeviceGetName")
    memory = (answer(rec, "nvmlDeviceGetMemoryInfo") or {}).get("total")
    if not uuid:
        return fail(name, f"NVML gave no UUID for GPU 0 ({error_of(rec, 'nvmlDeviceGetUUID')})")
    devices = (status.get("gpus") or {}).get("devices") or []
    seen = next((d for d in devices if d.get("uuid") == uuid), None)
    if seen is None:
        return fail(name, f"status lists no GPU {uuid} (problem: {(status.get('gpus') or {}).get('problem')!r})")
    wrong = [k for k, want in (("name", card), ("memory_bytes", memory)) if seen.get(k) != want]
    if wrong or not seen.get("healthy", False):
        return fail(name, f"status differs from NVML in {wrong or 'health'}: {seen}")
    if uuid not in gpu_list or str(card) not in gpu_list:
        return fail(name, "`appliance gpu list` does not name the card's UUID and name", listing=gpu_list[:300])
    return ok(name, gpu=card, uuid=uuid, memory=memory)


def gpu_slots(plan: dict) -> list[dict]:
    return [s for s in (plan or {}).get("slots", []) if s.get("gpus")]


def judge_plan(rec: dict, plan: dict) -> Check:
    name = "planner: one slot gets the GPU by its UUID"
    uuid = answer(rec, "nvmlDeviceGetUUID")
    mig = (answer(rec, "nvmlDeviceGetMigMode") or [0])[0] == 1
    slots = gpu_slots(plan)
    if mig:
        return judge_mig_slots(rec, plan, name)
    holders = [s for s in slots if uuid in s.get("gpus", [])]
    if len(holders) != 1 or holders[0]["gpus"] != [uuid]:
        return fail(name, f"GPU slots {[(s['name'], s['gpus']) for s in slots]}, wanted one with [{uuid}]")
    return ok(name, slot=holders[0]["name"], cpus=len(holders[0].get("cpus", [])))


def judge_affinity(rec: dict, plan: dict) -> Check:
    name = "CPU affinity: the GPU slot's CPUs are near the GPU"
    words = answer(rec, "nvmlDeviceGetCpuAffinity")
    if words is None:
        return na(name, f"NVML cannot tell the GPU's CPUs here ({error_of(rec, 'nvmlDeviceGetCpuAffinity')})")
    near = set(affinity_cpus(words))
    slots = gpu_slots(plan)
    if not slots:
        return fail(name, "no GPU slot in the plan")
    cpus = set(slots[0].get("cpus", []))
    if not near:
        return na(name, "NVML answered an empty CPU mask")
    if not cpus <= near:
        return fail(name, f"slot CPUs {sorted(cpus)} are not all in the GPU's {sorted(near)}")
    return ok(name, slot_cpus=",".join(map(str, sorted(cpus))), near=len(near))


def judge_mig_slots(rec: dict, plan: dict, name: str) -> Check:
    migs = [d.get("calls", {}).get("nvmlDeviceGetUUID", {}).get("value")
            for d in (rec.get("devices") or [{}])[0].get("mig_devices", [])]
    migs = [m for m in migs if m]
    slotted = sorted(u for s in gpu_slots(plan) for u in s.get("gpus", []))
    if sorted(migs) != slotted:
        return fail(name, f"MIG devices {migs} but GPU slots hold {slotted}")
    return ok(name, mig_slots=len(migs))


def judge_mig(rec: dict, plan: dict) -> Check:
    name = "MIG: its mode is read; MIG devices are slots"
    mode = answer(rec, "nvmlDeviceGetMigMode")
    if mode is None:
        err = error_of(rec, "nvmlDeviceGetMigMode")
        if err in ("Not Supported", "Function Not Found", "NVML_ERROR_NOT_SUPPORTED"):
            return na(name, f"MIG not supported by this card or driver ({err})")
        return fail(name, f"NVML could not read the MIG mode: {err}")
    if mode[0] != 1:
        return na(name, "MIG disabled", mode=mode[0], pending=mode[1])
    return judge_mig_slots(rec, plan, name)


def probe_of(job: dict) -> dict:
    """The workload's last `PROOF` record of a mode (probe/hold), or {}."""
    return (job or {}).get("probe") or {}


def judge_cuda(job: dict, slot_uuid: str) -> Check:
    name = "CUDA driver API (ctypes) in the GPU slot: one device, the slot's, memory allocated and copied"
    p = probe_of(job)
    if not p:
        return fail(name, f"no report from the workload ({_job_end(job)})")
    c = p.get("cuda") or {}
    if "error" in c:
        return fail(name, c["error"], cuda_visible_devices=p.get("cuda_visible_devices"))
    if c.get("device_count") != 1 or [_bare(u) for u in c.get("uuids") or []] != [_bare(slot_uuid)]:
        return fail(name, f"saw {c.get('uuids')}, wanted exactly [{slot_uuid}]",
                    cuda_visible_devices=p.get("cuda_visible_devices"))
    if not c.get("copy_ok"):
        return fail(name, "memory copied to the device did not come back the same")
    return ok(name, uuid=slot_uuid, allocated=c.get("allocated_bytes"), driver=c.get("driver_version"),
              cuda_visible_devices=p.get("cuda_visible_devices"))


def judge_torch(job: dict, slot_uuid: str) -> Check:
    name = "PyTorch in the GPU slot: one device, the slot's, tensor allocated and copied"
    t = probe_of(job).get("torch")
    if t is None:
        return fail(name, f"no report from the workload ({_job_end(job)})")
    if "missing" in t:
        return na(name, f"no PyTorch in the box's python ({t['missing'][:120]})")
    if "error" in t:
        return fail(name, t["error"])
    if not t.get("cuda_available") or t.get("device_count") != 1:
        return fail(name, f"torch sees {t.get('device_count')} devices (cuda_available={t.get('cuda_available')})")
    if t.get("uuid") is not None and _bare(t["uuid"]) != _bare(slot_uuid):
        return fail(name, f"torch's device is {t['uuid']}, the slot's is {slot_uuid}")
    if not t.get("copy_ok"):
        return fail(name, "the tensor copied back differs")
    return ok(name, torch=t.get("version"), uuid=t.get("uuid") or "(torch too old to say)",
              busy_matmuls=t.get("busy_matmuls", 0))


def _bare(uuid: str) -> str:
    """A UUID without its GPU-/MIG- prefix (CUDA writes a MIG device's UUID as GPU-...)."""
    return str(uuid).split("-", 1)[1] if str(uuid).startswith(("GPU-", "MIG-")) else str(uuid)


def judge_cpu_slot(job: dict) -> Check:
    name = "a workload in a CPU slot sees no GPU"
    p = probe_of(job)
    if not p:
        return fail(name, f"no report from the workload ({_job_end(job)})")
    if not str(job.get("slot", "")).startswith("slot-") or job.get("slot_kind") != "cpu":
        return na(name, f"the CPU-only request ran in {job.get('slot')} ({job.get('slot_kind')}), not a CPU slot")
    c, t = p.get("cuda") or {}, p.get("torch") or {}
    cuda_none = c.get("device_count") == 0 or "NO_DEVICE" in c.get("error", "") or "no libcuda" in c.get("error", "")
    torch_none = "missing" in t or not t.get("device_count")
    if not (cuda_none and torch_none):
        return fail(name, f"it saw CUDA {c} and torch {t}", cuda_visible_devices=p.get("cuda_visible_devices"))
    return ok(name, slot=job.get("slot"), cuda_visible_devices=repr(p.get("cuda_visible_devices")),
              cuda=c.get("error") or f"{c.get('device_count')} devices")


def judge_memory_matching(card_bytes: int, too_big: dict, fits: dict) -> Check:
    name = "GPU-memory matching: a request over the card is refused with its reason; one that fits runs"
    reason = (too_big or {}).get("dead_reason")
    if not reason:
        return fail(name, f"the request for more GPU memory than the card's was not refused ({_job_end(too_big)})")
    if "gpu" not in reason.lower():
        return fail(name, f"refused, but the reason does not say GPU memory: {reason}")
    if (fits or {}).get("outcome") != "success":
        return fail(name, f"the request that fits did not run to success ({_job_end(fits)})")
    # which slot looked decides the reason: a CPU slot says "needs 1 gpus, slot has 0"
    names_memory = "gib" in reason.lower() or "memory" in reason.lower()
    return ok(name, card=card_bytes, asked=too_big.get("asked_bytes"), reason_names_gpu_memory=names_memory,
              reason=reason[:100])


def judge_share(shared: dict) -> Check:
    """Two slots on one card: both jobs at once; the one over its share stopped by the watch."""
    name = "shared GPU (share = 2): two jobs at once; one over its share stopped (gpu memory)"
    good, hog = shared.get("good") or {}, shared.get("hog") or {}
    if shared.get("problem"):
        return fail(name, shared["problem"])
    (gs, ge), (hs, he) = _span(good), _span(hog)
    if None in (gs, ge, hs, he):
        return fail(name, f"a job did not report its times (good: {_job_end(good)}; over: {_job_end(hog)})")
    both = max(gs, hs) < min(ge, he)
    attributed = shared.get("nvml_attributed")  # whether NVML listed the jobs' pids with their memory
    figures = {"overlap": both, "slots": f"{good.get('slot')},{hog.get('slot')}",
               "hog_outcome": hog.get("outcome"), "class": hog.get("class")}
    if good.get("outcome") != "success":
        return fail(name, f"the job within its share ended {_job_end(good)}", **figures)
    if good.get("slot") == hog.get("slot"):
        return fail(name, "both jobs ran in the same slot, one after the other", **figures)
    if hog.get("outcome") == "GPU memory over the slot's share":
        return ok(name, **figures) if both else fail(name, "the jobs did not run at the same time", **figures)
    if not attributed:
        return na(name, "NVML here does not attribute GPU memory to processes "
                  f"({shared.get('nvml_processes_note') or 'no process list'}), so no watch can", **figures)
    return fail(name, f"the job over its share was not stopped by the watch ({_job_end(hog)})", **figures)


def _span(job: dict) -> tuple:
    """(start, end) of a workload: its own clock, else the runner's (a stopped job prints no end)."""
    p = probe_of(job)
    return p.get("t_start") or job.get("t_started"), p.get("t_end") or job.get("finished")


def metric_samples(text: str, uuid: str) -> dict:
    """{metric: value} of the GPU `uuid` in one /metrics scrape."""
    out = {}
    for m in re.finditer(r'^(appliance_gpu_\w+)\{([^}]*)\} (\S+)$', text or "", re.M):
        if f'uuid="{uuid}"' in m.group(2):
            out[m.group(1)] = float(m.group(3))
    return out


def judge_metrics(scrapes: list, idle_used: int, busy_kernels: bool, uuid: str) -> Check:
    """scrapes: /metrics texts taken while the GPU job ran."""
    name = "/metrics: the card's real utilisation and memory while a job runs"
    samples = [metric_samples(t, uuid) for t in scrapes]
    util = max((s.get("appliance_gpu_utilization_ratio", 0.0) for s in samples), default=0.0)
    used = max((s.get("appliance_gpu_memory_used_bytes", 0.0) for s in samples), default=0.0)
    total = max((s.get("appliance_gpu_memory_total_bytes", 0.0) for s in samples), default=0.0)
    figures = {"scrapes": len(scrapes), "max_util": util, "max_used": int(used), "idle_used": idle_used,
               "total": int(total)}
    if not any(samples):
        return fail(name, "no appliance_gpu_* sample of the card in any scrape", **figures)
    if used < idle_used + (128 << 20):
        return fail(name, "GPU memory in use never rose while the job held memory", **figures)
    if busy_kernels and util <= 0:
        return fail(name, "utilisation stayed 0 while the job ran kernels", **figures)
    if not busy_kernels:
        return ok(name, note="memory only: the job ran no kernels (no PyTorch)", **figures)
    return ok(name, **figures)


def judge_timings(job: dict) -> Check:
    name = "timings: GPU request enqueued -> workload start; the job's wall time"
    p = probe_of(job)
    if not p or not job.get("enqueued"):
        return fail(name, f"no timings ({_job_end(job)})")
    figures = {"enqueue_to_start_s": round(p["t_start"] - job["enqueued"], 2),
               "workload_s": round(p["t_end"] - p["t_start"], 2),
               "job_wall_s": (job.get("report") or {}).get("wall_seconds")}
    return ok(name, **figures)


def _job_end(job: dict) -> str:
    if not job:
        return "never seen"
    bits = [f"{k}={job[k]}" for k in ("key", "slot", "outcome", "class", "reason", "dead_reason", "error")
            if job.get(k)]
    return ", ".join(bits) or "no result"


# ---------------------------------------------------------------- NVML's answers


def record_nvml(nvml, with_topology: bool = True) -> dict:
    """Ask NVML what the appliance asks (appliance/gpus.py, the GPU watch, metrics) and keep each
    answer as {"value": ...} or {"error": code, "error_name": text}. `nvml` is the pynvml module."""

    def ask(fn_name, *args, convert=lambda v: v):
        fn = getattr(nvml, fn_name, None)
        if fn is None:
            return {"error": "missing", "error_name": f"pynvml has no {fn_name}"}
        try:
            return {"value": convert(fn(*args))}
        except nvml.NVMLError as e:
            return {"error": getattr(e, "value", None), "error_name": _text(e)}
        except Exception as e:  # noqa: BLE001 - a shape the fake must learn too
            return {"error": type(e).__name__, "error_name": f"{type(e).__name__}: {e}"}

    rec = {"pynvml": getattr(nvml, "__version__", None) or _dist_version("nvidia-ml-py")}
    rec["nvmlInit"] = ask("nvmlInit", convert=lambda v: None)
    if "error" in rec["nvmlInit"]:
        return rec
    try:
        rec["driver_version"] = ask("nvmlSystemGetDriverVersion", convert=_text)
        rec["cuda_driver_version"] = ask("nvmlSystemGetCudaDriverVersion")
        rec["nvmlDeviceGetCount"] = count = ask("nvmlDeviceGetCount")
        handles, rec["devices"] = [], []
        for i in range(count.get("value") or 0):
            h = ask("nvmlDeviceGetHandleByIndex", i, convert=lambda v: v)
            dev = {"index": i, "calls": {}}
            rec["devices"].append(dev)
            if "error" in h:
                dev["calls"]["nvmlDeviceGetHandleByIndex"] = h
                continue
            handle = h["value"]
            handles.append(handle)
            dev["calls"] = _device_calls(ask, nvml, handle, mig_parent=True)
            uuid = dev["calls"]["nvmlDeviceGetUUID"].get("value")
            if uuid:
                dev["calls"]["nvmlDeviceGetHandleByUUID"] = ask("nvmlDeviceGetHandleByUUID", uuid,
                                                                convert=lambda v: "a handle")
            dev["mig_devices"] = []
            for m in range(dev["calls"]["nvmlDeviceGetMaxMigDeviceCount"].get("value") or 0):
                mh = ask("nvmlDeviceGetMigDeviceHandleByIndex", handle, m)
                if "error" in mh:
                    dev["mig_devices"].append({"index": m, "handle": mh})
                    continue
                dev["mig_devices"].append({"index": m, "calls": _device_calls(ask, nvml, mh["value"], False)})
        if with_topology:
            rec["topology"] = [
                {"pair": [a, b],
                 "nvlink_p2p": ask("nvmlDeviceGetP2PStatus", handles[a], handles[b],
                                   getattr(nvml, "NVML_P2P_CAPS_INDEX_NVLINK", 6)),
                 "common_ancestor": ask("nvmlDeviceGetTopologyCommonAncestor", handles[a], handles[b])}
                for a in range(len(handles)) for b in range(a + 1, len(handles))]
    finally:
        ask("nvmlShutdown")
    return rec


def _device_calls(ask, nvml, handle, mig_parent: bool) -> dict:
    calls = {
        "nvmlDeviceGetUUID": ask("nvmlDeviceGetUUID", handle, convert=_text),
        "nvmlDeviceGetName": ask("nvmlDeviceGetName", handle, convert=_text),
        "nvmlDeviceGetMemoryInfo": ask("nvmlDeviceGetMemoryInfo", handle, convert=lambda m: {
            "total": int(m.total), "free": int(m.free), "used": int(m.used)}),
        "nvmlDeviceGetUtilizationRates": ask("nvmlDeviceGetUtilizationRates", handle,
                                             convert=lambda u: {"gpu": int(u.gpu), "memory": int(u.memory)}),
        "nvmlDeviceGetComputeRunningProcesses": ask("nvmlDeviceGetComputeRunningProcesses", handle, convert=lambda ps: [
            {"pid": int(p.pid), "usedGpuMemory": None if p.usedGpuMemory is None else int(p.usedGpuMemory),
             "gpuInstanceId": getattr(p, "gpuInstanceId", None),
             "computeInstanceId": getattr(p, "computeInstanceId", None)} for p in ps]),
        "nvmlDeviceGetProcessUtilization": ask("nvmlDeviceGetProcessUtilization", handle, 0, convert=lambda ss: [
            {"pid": int(s.pid), "smUtil": int(s.smUtil), "memUtil": int(s.memUtil)} for s in ss]),
    }
    if mig_parent:
        calls["nvmlDeviceGetTotalEccErrors"] = ask(
            "nvmlDeviceGetTotalEccErrors", handle, getattr(nvml, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
            getattr(nvml, "NVML_VOLATILE_ECC", 0), convert=int)
        calls["nvmlDeviceGetCpuAffinity"] = ask("nvmlDeviceGetCpuAffinity", handle, 4,
                                                convert=lambda words: [int(w) for w in words])
        calls["nvmlDeviceGetMigMode"] = ask("nvmlDeviceGetMigMode", handle, convert=lambda m: [int(x) for x in m])
        calls["nvmlDeviceGetMaxMigDeviceCount"] = ask("nvmlDeviceGetMaxMigDeviceCount", handle, convert=int)
    return calls


def fake_description(rec: dict) -> dict:
    """A recorded NVML as the JSON tests/fake_nvml reads ({"gpus": [...]}): the fake box that
    answers the appliance's calls as the recorded card did."""
    gpus = []
    for dev in rec.get("devices") or []:
        c = dev.get("calls") or {}
        if "nvmlDeviceGetUUID" not in c:
            gpus.append({"uuid": f"unknown-{dev['index']}", "lost": True})
            continue
        g = {"uuid": c["nvmlDeviceGetUUID"].get("value"), "name": c["nvmlDeviceGetName"].get("value"),
             "memory": (c["nvmlDeviceGetMemoryInfo"].get("value") or {}).get("total"),
             "ecc": c.get("nvmlDeviceGetTotalEccErrors", {}).get("value") or 0, "lost": False,
             "memory_used": (c["nvmlDeviceGetMemoryInfo"].get("value") or {}).get("used") or 0}
        cpus = affinity_cpus(c.get("nvmlDeviceGetCpuAffinity", {}).get("value"))
        if cpus:
            g["cpus"] = cpus
        util = c.get("nvmlDeviceGetUtilizationRates", {}).get("value")
        if util:
            g["util"], g["memory_util"] = util["gpu"], util["memory"]
        mode = c.get("nvmlDeviceGetMigMode", {}).get("value")
        if mode is not None:
            g["mig"] = {"enabled": mode[0] == 1, "pending": mode[1],
                        "max": c.get("nvmlDeviceGetMaxMigDeviceCount", {}).get("value") or 7,
                        "devices": [{"index": m["index"], "uuid": m["calls"]["nvmlDeviceGetUUID"].get("value"),
                                     "memory": (m["calls"]["nvmlDeviceGetMemoryInfo"].get("value") or {}).get("total")}
                                    for m in dev.get("mig_devices", []) if "calls" in m]}
            if not g["mig"]["enabled"]:
                g["mig"]["max"] = 7  # a disabled card answers 0; the fake derives that from "enabled"
        sm = {s["pid"]: s for s in c.get("nvmlDeviceGetProcessUtilization", {}).get("value") or []}
        procs = c.get("nvmlDeviceGetComputeRunningProcesses", {}).get("value") or []
        if procs:
            g["processes"] = [{"pid": p["pid"], "used_memory": p["usedGpuMemory"],
                               "sm_util": sm.get(p["pid"], {}).get("smUtil", 0),
                               "mem_util": sm.get(p["pid"], {}).get("memUtil", 0)} for p in procs]
        gpus.append(g)
    return {"gpus": gpus, "fail": ""}


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _dist_version(name: str):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------- is there a driver at all


NVML_ERROR_DRIVER_NOT_LOADED = 9


def driver_problem() -> str:
    """'' when NVML's library loads and answers nvmlInit; else why not ("no driver: ..." when
    there is no NVIDIA driver at all, as on a box without a card)."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as e:
        return f"no driver: libnvidia-ml.so.1 does not load ({e})"
    init = getattr(lib, "nvmlInit_v2", None) or getattr(lib, "nvmlInit", None)
    rc = init() if init else -1
    if rc == NVML_ERROR_DRIVER_NOT_LOADED:  # the library without its kernel driver (a CUDA image, no card)
        return "no driver: nvmlInit answered NVML_ERROR_DRIVER_NOT_LOADED"
    if rc != 0:
        return f"nvmlInit answered {rc}"
    shutdown = getattr(lib, "nvmlShutdown", None)
    if shutdown:
        shutdown()
    return ""


def main(argv) -> int:
    if argv[:1] == ["--driver-check"]:
        problem = driver_problem()
        if problem.startswith("no driver"):
            print(NO_DRIVER_LINE)
            return 3
        if problem:  # a driver that does not work: nothing can be proved, and that must show
            print(f"an NVIDIA driver is here but NVML does not start ({problem}): nothing proved")
            return 4
        return 0
    if argv[:1] == ["--to-fake"] and len(argv) == 2:  # a report's NVML record -> the fake's JSON
        data = json.load(open(argv[1]))
        rec = data.get("nvml", {}).get("idle", data)
        print(json.dumps(fake_description(rec), indent=2))
        return 0
    print("usage: proof.py --driver-check | --to-fake REPORT.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
