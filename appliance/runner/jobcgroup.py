"""One job's cgroup (process backend), and what the job used.

The slot's `job` leaf cgroup is made anew for each workload (`fresh_job_cgroup`), limited to
the request's `ram`: its peak memory, CPU time and OOM count are the workload's own, not the
environment build's or an earlier job's. After the job, what it left goes (`end_job`): its
processes, and what it wrote to the slot's /dev/shm. Where a job has no cgroup of its own (the
docker backend), `MemoryWatch` holds it to its `ram`. execute.py runs the workload with these
(and re-exports them).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from appliance.runner.launcher import Launcher

log = logging.getLogger("appliance.runner.execute")


def job_cgroup(slot: Optional[str]) -> Optional[str]:
    """`slot` if its job cgroup exists on this host (process backend), else None: no slot
    (dev, tests), or the docker backend, where the container itself is the slot."""
    if not slot:
        return None
    try:
        from appliance.slot import cgroup
        cg = cgroup.SlotCgroup(slot)
        return slot if os.path.isdir(cg.path(cg.hierarchy.memory, "job")) else None
    except Exception:
        return None


def _job_file(slot: str, root: Optional[str], name: str) -> Optional[str]:
    from appliance.slot import cgroup
    if not root:
        return None
    try:
        with open(os.path.join(cgroup.SlotCgroup(slot).path(root, "job"), name)) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def job_cpu_seconds(slot: Optional[str]) -> Optional[float]:
    """CPU time charged to the slot's job cgroup so far (v2 cpu.stat, v1 cpuacct.usage), or None."""
    if not slot:
        return None
    from appliance.slot import cgroup
    h = cgroup.current_hierarchy()
    if h.version == "v2":
        text = _job_file(slot, h.cpuset, "cpu.stat") or ""
        usec = next((int(v) for k, _, v in (ln.partition(" ") for ln in text.splitlines())
                     if k == "usage_usec" and v.strip().isdigit()), None)
        return usec / 1e6 if usec is not None else None
    text = (_job_file(slot, h.cpuacct, "cpuacct.usage") or "").strip()
    return int(text) / 1e9 if text.isdigit() else None


def job_peak_memory(slot: Optional[str]) -> Optional[int]:
    """Peak memory of the slot's job cgroup (v1 memory.max_usage_in_bytes, v2 memory.peak), or None."""
    if not slot:
        return None
    from appliance.slot import cgroup
    h = cgroup.current_hierarchy()
    name = "memory.peak" if h.version == "v2" else "memory.max_usage_in_bytes"
    text = (_job_file(slot, h.memory, name) or "").strip()
    return int(text) if text.isdigit() else None


def reset_job_peak(slot: Optional[str]) -> None:
    """Start the job cgroup's memory peak afresh (v1; v2 from Linux 6.12): the leaf serves every job."""
    if not slot:
        return
    from appliance.slot import cgroup
    h = cgroup.current_hierarchy()
    name = "memory.peak" if h.version == "v2" else "memory.max_usage_in_bytes"
    try:
        with open(os.path.join(cgroup.SlotCgroup(slot).path(h.memory, "job"), name), "w") as f:
            f.write("0")
    except (OSError, ValueError):
        pass


class Usage:
    """What one workload used: CPU seconds and peak memory from its job cgroup, or from
    getrusage of the runner's children when there is no cgroup (no slot: tests, `python=`)."""

    def __init__(self, slot: Optional[str]):
        import resource
        self.slot = slot
        reset_job_peak(slot)
        self.cpu0 = job_cpu_seconds(slot)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.ru0 = ru.ru_utime + ru.ru_stime
        self.started = time.time()

    def cpu_now(self) -> float:
        import resource
        cpu = job_cpu_seconds(self.slot)
        if cpu is not None and self.cpu0 is not None:
            return cpu - self.cpu0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime - self.ru0

    def report(self, hwm: Optional[int] = None) -> dict:
        """`hwm`: the largest VmHWM seen of the workload process while it ran (see `reap`).

        The peak is the larger of the job cgroup's peak (every process of the job, its /dev/shm
        pages, the page cache it filled) and the workload's VmHWM, which also counts the shared
        libraries it maps (pages the cgroup charged to whoever read them first)."""
        import resource
        peak = job_peak_memory(self.slot)
        if peak is None and hwm is None:  # largest child ever: an upper bound only when the runner had bigger ones
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        elif hwm is not None:
            peak = max(peak or 0, hwm)
        return {"cpu_seconds": round(self.cpu_now(), 3), "peak_memory_bytes": peak,
                "wall_seconds": round(time.time() - self.started, 3)}


def fresh_job_cgroup(slot: Optional[str], memory_bytes: Optional[int],
                     launcher: Optional["Launcher"] = None) -> tuple[Optional[int], str]:
    """Give the workload about to start a new job cgroup, limited to `memory_bytes` (the
    request's `ram`; None or 0: the slot's limit). A waiting launcher process moves along; the
    leaf made for it when it started (`Launcher.fresh_leaf`) serves as it is, given the limit.
    Returns (the limit set when it is below the slot's, else None; a warning for the workload's
    output when that failed, else "": also when there is no job cgroup, as on the docker backend)."""
    if not slot:
        return None, ""
    if launcher is not None:
        launcher.ready()
    keep = launcher.proc.pid if launcher is not None and launcher.proc is not None \
        and launcher.proc.poll() is None else None
    try:
        from appliance.slot import cgroup
        cg = cgroup.SlotCgroup(slot)
        if not memory_bytes and not os.path.isdir(cg.memory_dir):
            return None, ""  # no slot cgroup here: joining it will say so
        if os.geteuid() != 0:  # a runner that dropped root keeps the one leaf handed to it
            if not memory_bytes:
                return None, ""
            raise PermissionError("the runner is not root")
        slot_limit = cg.memory_limit()
        if memory_bytes and slot_limit and memory_bytes >= slot_limit:
            memory_bytes = None  # the slot's limit is the tighter one
        if keep and launcher.fresh_leaf:  # made when the launcher was started, for it alone
            launcher.fresh_leaf = False
            if memory_bytes:
                cg.limit_job(memory_bytes)
        else:
            cg.fresh_job(memory_bytes or None, keep=keep)
        return memory_bytes or None, ""
    except Exception as e:  # the old leaf serves: its limits, its counts
        if launcher is not None:
            launcher._discard()  # it may sit in the runner's leaf now: fork the workload instead
        limit = f" (so the request's ram {memory_bytes} bytes is not enforced)" if memory_bytes else ""
        return None, f"appliance: warning: cannot make a fresh job cgroup in slot {slot}{limit}: {e}\n"


def end_job(slot: Optional[str], user: Optional[tuple] = None) -> list[str]:
    """Nothing of a job may outlive it: kill what it left in the job cgroup (or, in a container,
    every process of the workload's account), then give the slot an empty /dev/shm of its
    full size. Returns problems, one line each (the caller logs them)."""
    from appliance.slot.shm import fresh_shm, in_slot_container
    problems = []
    if slot:
        kill_job_leftovers(slot)
    elif user and in_slot_container():
        kill_user_processes(user[0])
    try:
        fresh_shm()
    except Exception as e:
        problems.append(f"/dev/shm of the last job left in place: {e}")
        log.warning("slot %s: %s", slot, problems[-1])
    return problems


def kill_user_processes(uid: int, rounds: int = 20) -> int:
    """SIGKILL every process of `uid` we can see (in a container: the container's own). Never
    root's, never our own."""
    killed = 0
    if not uid:
        return 0
    for _ in range(rounds):
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != os.getpid():
                try:
                    if os.stat(f"/proc/{name}").st_uid == uid:
                        pids.append(int(name))
                except OSError:
                    pass
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)
    return killed


class MemoryWatch:
    """The request's `ram` where the job has no cgroup of its own (the docker backend, whose
    container is the whole slot; a runner without slot cgroups): at every supervision tick, the
    private memory (RssAnon) of the workload's processes (its session, and in a container every
    process of its account) plus what /dev/shm holds. Over `ram_bytes`: `check` says so, and
    the job is stopped. A burst between two looks can pass; the slot's limit holds anyway."""

    def __init__(self, ram_bytes: int, leader: int, uid: Optional[int] = None):
        self.ram_bytes, self.leader, self.uid = ram_bytes, leader, uid
        self.peak = 0
        self.tripped = False

    def used(self) -> int:
        total = 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    sid = int(f.read().rsplit(")", 1)[1].split()[3])
                if sid != self.leader and not (self.uid and os.stat(f"/proc/{name}").st_uid == self.uid):
                    continue
                with open(f"/proc/{name}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            total += int(line.split()[1]) * 1024
                            break
            except (OSError, ValueError, IndexError):
                continue
        from appliance.slot.shm import is_the_slots
        if is_the_slots():  # never the host's
            try:
                st = os.statvfs("/dev/shm")
                total += (st.f_blocks - st.f_bfree) * st.f_frsize
            except OSError:
                pass
        return total

    def check(self) -> Optional[str]:
        used = self.used()
        self.peak = max(self.peak, used)
        if used > self.ram_bytes and not self.tripped:
            self.tripped = True
            return f"the workload exceeded its memory limit (the request's ram, {_mib(self.ram_bytes)})"
        return None


def oom_kills(slot: Optional[str]) -> Optional[int]:
    """OOM kill count of the slot's job cgroup, or None when there is no cgroup to ask."""
    if not slot:
        return None
    try:
        from appliance.slot import cgroup
        return int(cgroup.SlotCgroup(slot).oom_kills())
    except Exception:
        return None


def kill_job_leftovers(slot: Optional[str]) -> int:
    """SIGKILL whatever the workload left in the slot's job cgroup (a daemon in a session of
    its own escapes the process-group kill, never the cgroup). The number killed."""
    if not slot:
        return 0
    try:
        from appliance.slot import cgroup
        return cgroup.SlotCgroup(slot).kill_leaf("job")
    except Exception:
        return 0


def container_oom_kills() -> Optional[int]:
    """OOM kills in the memory cgroup of the container we run in (docker backend: the
    container is the slot, and its own cgroup is what /sys/fs/cgroup shows); None if unknown."""
    for path in ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"):
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def in_container() -> bool:
    """Whether we run inside a docker (or podman) container."""
    return os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
