"""The GPU at job time, for one runner (NVML itself is in appliance/gpu_sampling.py).

- Free before a job: a compute process on the slot's GPUs that belongs to nothing of this
  appliance (a user's notebook, a crashed run of another tool) holds the slot back: it claims
  nothing until the process is gone (the messages stay in the queue, untouched), and `status`
  names the pid and its memory. Processes of neighbour slots sharing the GPU are theirs to
  watch and do not count.
- Within its share while it runs: the job's processes' GPU memory (NVML, per process) is
  looked at every few seconds; over the slot's share on any of its GPUs, the job is stopped
  ("GPU memory over the slot's share"). The share is APPLIANCE_GPU_MEMORY_BYTES (per GPU),
  else the whole card.
- Nothing left after it: GPU processes of the job still alive after it ended are killed.
- Accounted: peak GPU memory and mean SM utilisation of the job, in `status` and its result.

Who a pid belongs to: its cgroup (/proc/PID/cgroup) when the runner has a slot cgroup; else
its uid (the slot's own workload account; another slot's account: a neighbour) or its ancestry
(a child of the runner). An MPS server on the GPU is never foreign: it serves every slot.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

from appliance.gpu_sampling import GpuProcess, GpuWatch, Sample

log = logging.getLogger("appliance.runner")

MiB = 1 << 20
SHARE_ENV = "APPLIANCE_GPU_MEMORY_BYTES"
MPS_PIPE_DEFAULT = "/tmp/nvidia-mps"

JOB, SLOT, NEIGHBOUR, FOREIGN = "job", "slot", "neighbour", "foreign"


# ------------------------------------------------------------------ who owns a pid

@dataclass
class Membership:
    """Classifies pids as this slot's job, the slot (its runner), a neighbour slot, or foreign."""

    cgroup_slot: Optional[str]  # the slot whose job cgroup workloads join (None: no cgroups)
    runner_pid: int = field(default_factory=os.getpid)
    workload_uid: Optional[int] = None  # the slot's own account (None: workloads run as the runner)
    parent: str = ""  # the appliance's cgroup parent ("appliance")

    def __post_init__(self):
        if self.cgroup_slot and not self.parent:
            from appliance.slot.cgroup import cgroup_parent
            self.parent = cgroup_parent()

    def owner(self, pid: int) -> Optional[str]:
        """JOB / SLOT / NEIGHBOUR / FOREIGN, or None when the pid is gone (or a zombie)."""
        if not _alive(pid):
            return None
        if self.cgroup_slot:
            paths = _cgroup_paths(pid)
            if paths is None:
                return None
            mine = f"/{self.parent}/{self.cgroup_slot}"
            if any(p == f"{mine}/job" or p.startswith(f"{mine}/job/") for p in paths):
                return JOB
            if any(p == mine or p.startswith(mine + "/") for p in paths):
                return SLOT
            if any(p.startswith(f"/{self.parent}/") for p in paths):
                return NEIGHBOUR
            return FOREIGN
        uid = _uid(pid)
        if self.workload_uid is not None and uid == self.workload_uid:
            return JOB
        if self._descends(pid):
            return JOB
        return NEIGHBOUR if _slot_account(uid) else FOREIGN

    def _descends(self, pid: int) -> bool:
        for _ in range(64):
            if pid == self.runner_pid:
                return True
            pid = _ppid(pid)
            if pid is None or pid <= 1:
                return False
        return False


def _cgroup_paths(pid: int) -> Optional[list[str]]:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return [line.rstrip("\n").split(":", 2)[2] for line in f if line.count(":") >= 2]
    except OSError:
        return None


def _stat(pid: int) -> Optional[list[str]]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _ppid(pid: int) -> Optional[int]:
    st = _stat(pid)
    return int(st[1]) if st else None


def _slot_account(uid: Optional[int]) -> bool:
    """uid is one of the per-slot workload accounts (appliance-<slot>)."""
    import pwd
    from appliance.slot.users import PREFIX
    try:
        return uid is not None and uid != 0 and pwd.getpwuid(uid).pw_name.startswith(PREFIX)
    except KeyError:
        return False


def _mps(pid: int) -> bool:
    """An MPS control daemon or server (comm is cut to 15 characters: "nvidia-cuda-mps")."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().startswith("nvidia-cuda-mps")
    except OSError:
        return False


def _uid(pid: int) -> Optional[int]:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _size(n: Optional[int]) -> str:
    if n is None:
        return "unknown memory"
    from appliance.units import format_size
    return format_size(n)


def describe(procs: list[GpuProcess]) -> str:
    return ", ".join(f"pid {p.pid} ({_size(p.memory_bytes)} on {p.gpu})" for p in procs)


# ------------------------------------------------------------------ shares and knobs

def shares(watch: GpuWatch, environ) -> dict[str, int]:
    """GPU UUID -> bytes the slot may use on it: APPLIANCE_GPU_MEMORY_BYTES, else the card."""
    text = str(environ.get(SHARE_ENV, "")).strip()
    share = int(text) if text.isdigit() and int(text) > 0 else None
    return {d.uuid: min(share, d.total_bytes) if share else d.total_bytes for d in watch.devices}


def workload_env(watch: GpuWatch, share: dict[str, int], mode: str, environ) -> dict[str, str]:
    """What the frameworks and CUDA are told about the share (a request's own config.env wins).

    JAX: XLA_PYTHON_CLIENT_MEM_FRACTION, the share over the card (it preallocates 75% of the
    card otherwise). TensorFlow has no environment cap, and maps almost the whole card by
    default: TF_FORCE_GPU_ALLOW_GROWTH=true makes it take what it uses. PyTorch has no cap in
    its environment (PYTORCH_CUDA_ALLOC_CONF tunes the caching allocator, it cannot limit it).
    With isolation.gpu_share = "mps": CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, which the MPS server
    enforces per device ("<ordinal>=<MiB>M", ordinals as the workload sees them). The NVML
    watch is what holds for every framework."""
    if not watch.active:
        return {}
    out: dict[str, str] = {}
    shared = [d for d in watch.devices if share[d.uuid] < d.total_bytes]
    if shared:
        fraction = min(share[d.uuid] / d.total_bytes for d in shared)
        out["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{int(fraction * 100) / 100:.2f}"
        out["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    if mode == "mps":
        out["CUDA_MPS_PIPE_DIRECTORY"] = mps_pipe_dir(environ)
        out["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(
            f"{d.ordinal}={share[d.uuid] // MiB}M" for d in watch.devices)
    return out


def mps_pipe_dir(environ) -> str:
    return environ.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_PIPE_DEFAULT


def mps_problem(environ=os.environ) -> str:
    """'' when an MPS control daemon can be reached, else what is missing and the fix."""
    key = 'isolation.gpu_share = "mps"'
    off = 'or set isolation.gpu_share = "none"'
    path = environ.get("PATH", os.defpath)
    if shutil.which("nvidia-cuda-mps-control", path=path) is None:
        return (f"{key}, but nvidia-cuda-mps-control is not on PATH; fix: install the NVIDIA compute "
                f"utilities and start the daemon (nvidia-cuda-mps-control -d, as root), {off}")
    pipe = mps_pipe_dir(environ)
    if not os.path.exists(os.path.join(pipe, "control")):
        return (f"{key}, but no MPS control daemon listens in {pipe} (CUDA_MPS_PIPE_DIRECTORY); fix: "
                f"start it (CUDA_MPS_PIPE_DIRECTORY={pipe} nvidia-cuda-mps-control -d, as root), {off}")
    return ""


# ------------------------------------------------------------------ one runner's GPUs

class SlotGpus:
    """The runner's view of its GPUs: one GpuWatch for the runner's life."""

    def __init__(self, watch: GpuWatch, members: Optional[Membership], environ, mode: str = "none"):
        """`members` None: the pids NVML names are not ours to see (a container's own pid
        namespace): the knobs still apply, the process checks do not."""
        self.watch, self.members, self.mode = watch, members, mode
        self.share = shares(watch, environ)
        self.env = workload_env(watch, self.share, mode, environ) if watch.active else {}
        self.problem = watch.problem  # shown in status; with MPS missing, it also blocks
        if watch.active and members is None:
            self.problem = ("GPU processes are not watched in a container (NVML names host pids): no share "
                            "enforcement, no foreign-process check; the process backend has them")
        self.blocked = ""
        if watch.active and mode == "mps":
            self.blocked = mps_problem(environ)
            self.problem = self.blocked or self.problem

    @property
    def active(self) -> bool:
        return self.watch.active

    def foreign(self) -> list[GpuProcess]:
        """Compute processes on the slot's GPUs that belong to nothing of this appliance."""
        if not self.active or self.members is None:
            return []
        return [p for p in self.watch.processes()
                if self.members.owner(p.pid) == FOREIGN and not _mps(p.pid)]  # MPS serves every slot

    def job_processes(self) -> list[GpuProcess]:
        if not self.active or self.members is None:
            return []
        return [p for p in self.watch.processes() if self.members.owner(p.pid) == JOB]

    def kill_job_processes(self, wait_s: float = 5.0) -> list[GpuProcess]:
        """SIGKILL the job's GPU processes still alive (the job has ended), wait until they
        are gone; returns them."""
        procs = self.job_processes()
        for p in procs:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + wait_s
        while any(_alive(p.pid) for p in procs) and time.monotonic() < end:
            time.sleep(0.02)
        return procs

    def close(self) -> None:
        self.watch.close()


class JobGpu:
    """Watches one job: its GPU memory against the share, peak memory, mean utilisation."""

    def __init__(self, gpus: SlotGpus, every_s: float):
        self.gpus, self.every_s = gpus, every_s
        self.next_look = 0.0
        self.peak = 0
        self.now = 0
        self.unknown = False  # NVML could not say the memory of one of its processes
        self.util: dict[tuple, int] = {}  # (gpu, time stamp) -> summed SM % of its processes
        self.gpus.watch.samples()  # from here on: only this job's time

    def look(self, force: bool = False) -> Optional[str]:
        """Every `every_s`: sample; the reason to stop the job if it is over its share."""
        t = time.monotonic()
        if not force and t < self.next_look:
            return None
        self.next_look = t + self.every_s
        members = self.gpus.members
        mine = self.gpus.job_processes()
        used: dict[str, int] = {}
        for p in mine:
            if p.memory_bytes is None:
                self.unknown = True
                continue
            used[p.gpu] = used.get(p.gpu, 0) + p.memory_bytes
        self.now = sum(used.values())
        self.peak = max(self.peak, self.now)
        pids = {p.pid for p in mine}
        for s in self.gpus.watch.samples():
            if s.pid in pids or (members is not None and members.owner(s.pid) == JOB):
                self._add(s)
        for gpu, n in used.items():
            share = self.gpus.share.get(gpu)
            if share is not None and n > share:
                return (f"the workload used {_size(n)} of GPU memory on {gpu}, over the slot's share of "
                        f"{_size(share)} (APPLIANCE_GPU_MEMORY_BYTES); it was stopped so its neighbours "
                        f"keep theirs")
        return None

    def _add(self, s: Sample) -> None:
        key = (s.gpu, s.time_us)
        self.util[key] = min(100, self.util.get(key, 0) + s.sm_pct)

    def summary(self) -> dict:
        """Plain facts for `status` and the result record."""
        util = round(sum(self.util.values()) / len(self.util), 1) if self.util else None
        share = self.gpus.share
        return {"gpus": list(share), "share_bytes": min(share.values()) if share else None,
                "memory_bytes": self.now, "peak_memory_bytes": self.peak,
                "memory_unknown": self.unknown, "util_mean_pct": util, "util_samples": len(self.util)}


def slot_gpus(environ, cgroup_slot: Optional[str], workload_uid: Optional[int], mode: str,
              in_container: bool = False) -> SlotGpus:
    """The runner's SlotGpus from its environment (CUDA_VISIBLE_DEVICES of the slot)."""
    from appliance.gpu_sampling import visible_devices
    visible = visible_devices(environ.get("CUDA_VISIBLE_DEVICES", ""))
    members = None if in_container else Membership(cgroup_slot, workload_uid=workload_uid)
    return SlotGpus(GpuWatch(visible), members, environ, mode)


def hold_of(gpus, slot: str) -> Optional[dict]:
    """Why the GPUs `gpus` (a SlotGpus) cannot take a job now: {"reason", "processes"} (MPS
    missing, a foreign process on them), or None when they can."""
    if gpus.blocked:
        return {"reason": gpus.blocked, "processes": []}
    try:
        foreign = gpus.foreign()
    except Exception:  # noqa: BLE001 - a watch failure must not stop the runner
        log.exception("slot %s: looking for foreign GPU processes", slot)
        foreign = []
    if not foreign:
        return None
    return {"reason": f"GPU in use by a process outside this appliance: {describe(foreign)}",
            "processes": [{"gpu": p.gpu, "pid": p.pid, "memory_bytes": p.memory_bytes} for p in foreign]}
