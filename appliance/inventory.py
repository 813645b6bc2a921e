"""What the host really has: usable CPUs, memory, NUMA layout, cgroup version, GPUs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from appliance.gpus import Gpu, GpuScan, scan_gpus

SYS = Path("/sys")
PROC = Path("/proc")


@dataclass(frozen=True)
class Inventory:
    cpus: tuple[int, ...]  # online CPUs this process may use (affinity ∩ cgroup cpuset)
    memory_bytes: int  # physical memory, or our cgroup's limit when lower
    numa_of_cpu: dict = field(default_factory=dict)  # cpu -> NUMA node
    cgroup_version: str = "unknown"
    gpus: tuple[Gpu, ...] = ()
    gpu_problem: str = ""  # why there are no GPUs

    def numa_nodes(self, cpus) -> tuple[int, ...]:
        return tuple(sorted({self.numa_of_cpu.get(c, 0) for c in cpus})) or (0,)


def parse_cpu_list(text: str) -> list[int]:
    """Linux list format "0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"{text!r} is not a CPU list (write e.g. 0-3,8)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"{part!r} in {text!r} runs backwards")
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def format_cpu_list(cpus) -> str:
    """[0, 1, 2, 3, 8] -> "0-3,8"."""
    out, run = [], []
    for cpu in sorted(set(cpus)):
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [cpu]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def usable_cpus() -> list[int]:
    """Online CPUs in our affinity mask (which already reflects the cgroup cpuset)."""
    allowed = set(os.sched_getaffinity(0))
    online = _read(SYS / "devices/system/cpu/online")
    if online:
        allowed &= set(parse_cpu_list(online))
    return sorted(allowed)


def numa_map(cpus) -> dict[int, int]:
    mapping = {}
    for node_dir in sorted((SYS / "devices/system/node").glob("node[0-9]*")):
        listed = _read(node_dir / "cpulist")
        if listed:
            for cpu in parse_cpu_list(listed):
                mapping[cpu] = int(node_dir.name[4:])
    return {c: mapping.get(c, 0) for c in cpus}


def physical_memory() -> int:
    text = _read(PROC / "meminfo") or ""
    m = re.search(r"^MemTotal:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def cgroup_memory_limit() -> int | None:
    """The memory limit of the cgroup we run in (v2 or v1), if any is set."""
    for line in (_read(PROC / "self/cgroup") or "").splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0":
            value = _read(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max")
        elif "memory" in controllers.split(","):
            value = _read(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes")
        else:
            continue
        if value and value.isdigit() and int(value) < (1 << 60):
            return int(value)
    return None


def detect_cgroup_version() -> str:
    """"v2" (unified only), "v1" (legacy only), "hybrid" (v1 controllers + a cgroup2 mount)."""
    v1 = v2 = False
    for line in (_read(PROC / "self/mountinfo") or "").splitlines():
        fstype = line.split(" - ", 1)[-1].split(" ", 1)[0]
        v1 |= fstype == "cgroup"
        v2 |= fstype == "cgroup2"
    if v1 and v2:
        return "hybrid"
    return "v2" if v2 else ("v1" if v1 else "none")


def take_inventory(gpu_scan: GpuScan | None = None) -> Inventory:
    cpus = usable_cpus()
    memory = physical_memory()
    limit = cgroup_memory_limit()
    if limit:
        memory = min(memory, limit)
    scan = gpu_scan if gpu_scan is not None else scan_gpus(max(cpus, default=0) + 1)
    return Inventory(cpus=tuple(cpus), memory_bytes=memory, numa_of_cpu=numa_map(cpus),
                     cgroup_version=detect_cgroup_version(), gpus=scan.gpus, gpu_problem=scan.problem)
