"""A slot's cgroups on cgroup v1: one directory per controller hierarchy (cpuset, memory, and
cpuacct when it is mounted apart), each holding <parent>/<slot>/{runner,job}.

Every function takes the SlotCgroup (appliance/slot/cgroup/__init__.py) it works on.
"""

from __future__ import annotations

import os

from appliance.slot.cgroup.base import (
    LEAVES, RUNNER_PIDS, CgroupError, _check_subset, _keyed_value, _mkdir, _read, _read_or, _write,
)
from appliance.slot.limits import format_cpu_list, parse_cpu_list

OOM_FILE = "memory.oom_control"  # its oom_kill line counts the kills
LIMIT_FILE = "memory.limit_in_bytes"
USAGE_FILE = "memory.usage_in_bytes"


def setup(cg, cpus: list[int], mems: list[int], memory_bytes: int, pids_max: int | None) -> None:
    _setup_cpuset(cg, cpus, mems)
    _setup_memory(cg, memory_bytes)
    _setup_pids(cg, pids_max)
    _setup_cpuacct(cg)


def make_job(cg, memory_bytes: int | None, pids_max: str | None) -> None:
    """A new job leaf (the old one is gone): the slot's cpuset, its own memory limit (none: the
    slot's holds), the pids bound the old leaf had."""
    h = cg.hierarchy
    job = cg.path(h.cpuset, "job")
    _mkdir(job)
    for name in ("cpuset.cpus", "cpuset.mems"):  # an empty cpuset refuses processes
        _write(os.path.join(job, name), _read(os.path.join(cg.cpuset_dir, name)))
    _mkdir(cg.path(h.memory, "job"))
    if memory_bytes:
        limit_job(cg, memory_bytes)
    if h.pids:
        _mkdir(cg.path(h.pids, "job"))
        if pids_max:
            _write(os.path.join(cg.path(h.pids, "job"), "pids.max"), pids_max)
    root = cpuacct_root(cg)
    if root:
        try:
            _mkdir(cg.path(root, "job"))
        except CgroupError:
            pass  # CPU accounting only


def limit_job(cg, memory_bytes: int) -> None:
    """Lower the job leaf's memory limit (a new leaf's is unlimited), and its swap limit with it:
    over its limit, the job is killed, not swapped out."""
    job = cg.path(cg.hierarchy.memory, "job")
    _write(os.path.join(job, "memory.limit_in_bytes"), str(memory_bytes))
    memsw = os.path.join(job, "memory.memsw.limit_in_bytes")
    if os.path.exists(memsw):
        _write(memsw, str(memory_bytes))


def pids_dir(cg, leaf: str | None) -> str | None:
    """Where the pids bound of the slot (leaf None) or a leaf is, or None without the controller."""
    return cg.path(cg.hierarchy.pids, leaf) if cg.hierarchy.pids else None


def cpuacct_root(cg) -> str | None:
    """The cpuacct mount when it is one more hierarchy to keep the slot in, else None."""
    root = cg.hierarchy.cpuacct
    if not root or root in cg.hierarchy.roots():
        return None
    return root


def delegated_files(cg, root: str) -> list[str]:
    """What a user must own to move itself into the job leaf: its cgroup.procs (or tasks)."""
    return [os.path.join(cg.path(root, "job"), "cgroup.procs"), os.path.join(cg.path(root, "job"), "tasks")]


def cpu_seconds(cg) -> float | None:
    """cpuacct.usage of the slot, or None without a cpuacct hierarchy."""
    if not cg.hierarchy.cpuacct:
        return None
    text = _read_or(os.path.join(cg.path(cg.hierarchy.cpuacct), "cpuacct.usage"), "")
    return int(text) / 1e9 if text.isdigit() else None


def oom_kills(directory: str) -> int | None:
    return _keyed_value(_read_or(os.path.join(directory, OOM_FILE), ""), "oom_kill")


def _setup_cpuacct(cg) -> None:
    """The slot and its leaves in the cpuacct hierarchy too, to count its CPU time; a
    failure only costs that count."""
    root = cpuacct_root(cg)
    if root is None:
        return
    try:
        for here in cg._parent_dirs(root)[1:] + [cg.path(root)] + [cg.path(root, leaf) for leaf in LEAVES]:
            _mkdir(here)
    except CgroupError:
        pass


def _setup_pids(cg, pids_max: int | None) -> None:
    """The slot and its leaves in the pids hierarchy: the job may have pids_max processes and
    threads, the slot RUNNER_PIDS more for its runner. Nothing without the controller."""
    root = cg.hierarchy.pids
    if not root:
        return
    for here in cg._parent_dirs(root)[1:] + [cg.path(root)] + [cg.path(root, leaf) for leaf in LEAVES]:
        _mkdir(here)
    _write(os.path.join(cg.path(root), "pids.max"), str(pids_max + RUNNER_PIDS) if pids_max else "max")
    _write(os.path.join(cg.path(root, "job"), "pids.max"), str(pids_max) if pids_max else "max")


def _setup_cpuset(cg, cpus: list[int], mems: list[int]) -> None:
    # An empty cpuset.cpus/mems anywhere on the way makes adding a pid fail with ENOSPC,
    # so intermediate levels copy their parent's (the widest) sets.
    dirs = cg._parent_dirs(cg.hierarchy.cpuset)
    for above, here in zip(dirs, dirs[1:]):
        _mkdir(here)
        for name in ("cpuset.cpus", "cpuset.mems"):
            wanted = _read(os.path.join(above, name))
            if _read(os.path.join(here, name)) != wanted:
                _write(os.path.join(here, name), wanted)
    _check_subset(cpus, os.path.join(dirs[-1], "cpuset.cpus"), "CPU")
    _check_subset(mems, os.path.join(dirs[-1], "cpuset.mems"), "memory node")
    slot_dir = cg.cpuset_dir
    _mkdir(slot_dir)
    leaves = [cg.path(cg.hierarchy.cpuset, leaf) for leaf in LEAVES]
    for leaf in leaves:
        _mkdir(leaf)
    _set_cpuset(slot_dir, leaves, "cpuset.cpus", cpus)
    _set_cpuset(slot_dir, leaves, "cpuset.mems", mems)


def _setup_memory(cg, memory_bytes: int) -> None:
    for here in cg._parent_dirs(cg.hierarchy.memory)[1:] + [cg.memory_dir]:
        if _mkdir(here):
            _use_hierarchy(here)
    for leaf in LEAVES:
        _mkdir(cg.path(cg.hierarchy.memory, leaf))
    slot_dir = cg.memory_dir
    limit = os.path.join(slot_dir, "memory.limit_in_bytes")
    memsw = os.path.join(slot_dir, "memory.memsw.limit_in_bytes")
    value = str(memory_bytes)
    if not os.path.exists(memsw):
        _write(limit, value)
    elif memory_bytes > int(_read(limit)):
        # memsw (memory+swap) may never be below the memory limit: raise it first...
        _write(memsw, value)
        _write(limit, value)
    else:
        # ...and lower it last. Equal values mean: no swap for this slot.
        _write(limit, value)
        _write(memsw, value)


def _set_cpuset(slot_dir: str, leaves: list[str], name: str, wanted: list[int]) -> None:
    """Set a v1 cpuset file on the slot and its leaves without ever breaking "child within parent".

    Widen the slot to old+new, set the leaves, then narrow the slot: every step keeps each
    leaf a subset of the slot, so an update of a live slot does not fail with EBUSY.
    """
    text = format_cpu_list(wanted)
    current = parse_cpu_list(_read(os.path.join(slot_dir, name)))
    wide = sorted(set(current) | set(wanted))
    if wide != current:
        _write(os.path.join(slot_dir, name), format_cpu_list(wide))
    for leaf in leaves:
        if _read(os.path.join(leaf, name)) != text:
            _write(os.path.join(leaf, name), text)
    if wide != wanted:
        _write(os.path.join(slot_dir, name), text)


def _use_hierarchy(path: str) -> None:
    """Old kernels default to memory.use_hierarchy=0, where a child escapes its parent's limit."""
    flag = os.path.join(path, "memory.use_hierarchy")
    if _read_or(flag, "1") == "0":
        _write(flag, "1")
