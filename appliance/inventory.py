"""What the host really has: usable CPUs, memory, NUMA layout, cgroup version, GPUs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from appliance.gpus import Gpu, GpuLink, GpuScan, scan_gpus
from appliance.slot.cgroup import cgroup_version
from appliance.slot.limits import format_cpu_list, parse_cpu_list  # noqa: F401 (re-exported)

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
    gpu_links: tuple[GpuLink, ...] = ()  # how close GPUs are to each other (NVLink, PCIe, NUMA)

    def numa_nodes(self, cpus) -> tuple[int, ...]:
        return tuple(sorted({self.numa_of_cpu.get(c, 0) for c in cpus})) or (0,)


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


def take_inventory(gpu_scan: GpuScan | None = None) -> Inventory:
    cpus = usable_cpus()
    memory = physical_memory()
    limit = cgroup_memory_limit()
    if limit:
        memory = min(memory, limit)
    scan = gpu_scan if gpu_scan is not None else scan_gpus(max(cpus, default=0) + 1)
    return Inventory(cpus=tuple(cpus), memory_bytes=memory, numa_of_cpu=numa_map(cpus),
                     cgroup_version=cgroup_version(), gpus=scan.gpus, gpu_problem=scan.problem,
                     gpu_links=scan.links)
