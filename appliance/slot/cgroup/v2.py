"""A slot's cgroups on cgroup v2: one unified tree, <parent>/<slot>/{runner,job}, each level
enabling the controllers for the level below.

Every function takes the SlotCgroup (appliance/slot/cgroup/__init__.py) it works on.
"""

from __future__ import annotations

import os

from appliance.slot.cgroup.base import (
    FIX_NO_CGROUPS, LEAVES, CgroupError, _check_subset, _keyed_value, _mkdir, _read, _read_or, _write,
    _write_optional,
)
from appliance.slot.limits import format_cpu_list

OOM_FILE = "memory.events"  # its oom_kill line counts the kills
USAGE_FILE = "memory.current"


def setup(cg, cpus: list[int], mems: list[int], memory_bytes: int) -> None:
    root = cg.hierarchy.cpuset
    available = _read(os.path.join(root, "cgroup.controllers")).split()
    missing = [c for c in ("cpuset", "memory") if c not in available]
    if missing:
        raise CgroupError(
            f"cgroup v2 at {root} lacks the {' and '.join(missing)} controller; fix: {FIX_NO_CGROUPS}"
        )
    dirs = cg._parent_dirs(root) + [cg.cpuset_dir]
    # Each level enables the controllers for its children; the slot enables them for
    # its leaves, so job/memory.events and job/memory.oom.group exist.
    for here, below in zip(dirs, dirs[1:]):
        _enable_controllers(here)
        _mkdir(below)
    slot_dir = dirs[-1]
    for leaf in LEAVES:
        _mkdir(cg.path(root, leaf))
    _enable_controllers(slot_dir)
    _check_subset(cpus, os.path.join(dirs[-2], "cpuset.cpus.effective"), "CPU")
    _check_subset(mems, os.path.join(dirs[-2], "cpuset.mems.effective"), "memory node")
    _write(os.path.join(slot_dir, "cpuset.cpus"), format_cpu_list(cpus))
    _write(os.path.join(slot_dir, "cpuset.mems"), format_cpu_list(mems))
    _write(os.path.join(slot_dir, "memory.max"), str(memory_bytes))
    _write_optional(os.path.join(slot_dir, "memory.swap.max"), "0")
    _write(os.path.join(cg.path(root, "job"), "memory.oom.group"), "1")


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


def _enable_controllers(path: str) -> None:
    control = os.path.join(path, "cgroup.subtree_control")
    enabled = _read_or(control, "").split()
    missing = [c for c in ("cpuset", "memory") if c not in enabled]
    if missing:
        _write(control, " ".join("+" + c for c in missing))
