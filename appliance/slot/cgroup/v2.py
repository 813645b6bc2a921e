"""A slot's cgroups on cgroup v2: one unified tree, <parent>/<slot>/{runner,job}, each level
enabling the controllers for the level below.

Every function takes the SlotCgroup (appliance/slot/cgroup/__init__.py) it works on.
"""

from __future__ import annotations

import os

from appliance.slot.cgroup.base import (
    FIX_NO_CGROUPS, LEAVES, RUNNER_PIDS, CgroupError, _check_subset, _keyed_value, _mkdir, _read, _read_or, _write,
    _write_optional,
)
from appliance.slot.limits import format_cpu_list

OOM_FILE = "memory.events"  # its oom_kill line counts the kills
LIMIT_FILE = "memory.max"
USAGE_FILE = "memory.current"


def setup(cg, cpus: list[int], mems: list[int], memory_bytes: int, pids_max: int | None) -> None:
    root = cg.hierarchy.cpuset
    available = _read(os.path.join(root, "cgroup.controllers")).split()
    missing = [c for c in ("cpuset", "memory") if c not in available]
    if missing:
        raise CgroupError(
            f"cgroup v2 at {root} lacks the {' and '.join(missing)} controller; fix: {FIX_NO_CGROUPS}"
        )
    wanted = ["cpuset", "memory"] + (["pids"] if "pids" in available else [])
    dirs = cg._parent_dirs(root) + [cg.cpuset_dir]
    # Each level enables the controllers for its children; the slot enables them for
    # its leaves, so job/memory.events and job/memory.oom.group exist.
    for here, below in zip(dirs, dirs[1:]):
        _enable_controllers(here, wanted)
        _mkdir(below)
    slot_dir = dirs[-1]
    for leaf in LEAVES:
        _mkdir(cg.path(root, leaf))
    _enable_controllers(slot_dir, wanted)
    _check_subset(cpus, os.path.join(dirs[-2], "cpuset.cpus.effective"), "CPU")
    _check_subset(mems, os.path.join(dirs[-2], "cpuset.mems.effective"), "memory node")
    _write(os.path.join(slot_dir, "cpuset.cpus"), format_cpu_list(cpus))
    _write(os.path.join(slot_dir, "cpuset.mems"), format_cpu_list(mems))
    _write(os.path.join(slot_dir, "memory.max"), str(memory_bytes))
    _write_optional(os.path.join(slot_dir, "memory.swap.max"), "0")
    _write(os.path.join(cg.path(root, "job"), "memory.oom.group"), "1")
    if "pids" in wanted:  # the job may have pids_max processes and threads, the slot more for its runner
        _write(os.path.join(slot_dir, "pids.max"), str(pids_max + RUNNER_PIDS) if pids_max else "max")
        _write(os.path.join(cg.path(root, "job"), "pids.max"), str(pids_max) if pids_max else "max")


def make_job(cg, memory_bytes: int | None, pids_max: str | None) -> None:
    """A new job leaf (the old one is gone): its own memory limit (none: the slot's holds), the
    whole workload killed on OOM, the pids bound the old leaf had."""
    job = cg.path(cg.hierarchy.cpuset, "job")
    _mkdir(job)
    _write(os.path.join(job, "memory.oom.group"), "1")
    if memory_bytes:
        limit_job(cg, memory_bytes)
    if pids_max:
        _write_optional(os.path.join(job, "pids.max"), pids_max)


def limit_job(cg, memory_bytes: int) -> None:
    """The job leaf's memory limit."""
    _write(os.path.join(cg.path(cg.hierarchy.cpuset, "job"), "memory.max"), str(memory_bytes))


def pids_dir(cg, leaf: str | None) -> str | None:
    """Where the pids bound of the slot (leaf None) or a leaf is."""
    return cg.path(cg.hierarchy.cpuset, leaf)


def delegated_files(cg, root: str) -> list[str]:
    """What a user must own to move itself into the job leaf: the leaf's cgroup.procs and the
    common ancestor's (the slot's)."""
    return [os.path.join(cg.path(root, "job"), "cgroup.procs"), os.path.join(cg.path(root), "cgroup.procs")]


def cpu_seconds(cg) -> float | None:
    """usage_usec of the slot's cpu.stat, or None."""
    usec = _keyed_value(_read_or(os.path.join(cg.cpuset_dir, "cpu.stat"), ""), "usage_usec")
    return usec / 1e6 if usec is not None else None


def oom_kills(directory: str) -> int | None:
    return _keyed_value(_read_or(os.path.join(directory, OOM_FILE), ""), "oom_kill")


def _enable_controllers(path: str, wanted: list[str]) -> None:
    control = os.path.join(path, "cgroup.subtree_control")
    enabled = _read_or(control, "").split()
    missing = [c for c in wanted if c not in enabled]
    if missing:
        _write(control, " ".join("+" + c for c in missing))
