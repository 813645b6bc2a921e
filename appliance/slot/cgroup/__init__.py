"""Slot cgroups on cgroup v1 and v2: one SlotCgroup for both; `v1.py` and `v2.py` hold what
differs (which files, in which order), `base.py` what they share (finding the hierarchy, the
parent directory of an appliance's slots, the file helpers and their error messages).

Layout (below the cgroupfs mount of each controller we use):

    <parent>/<slot>          limits: cpuset.cpus/mems, memory limit; holds no process
    <parent>/<slot>/runner   the runner process itself
    <parent>/<slot>/job      the workload the runner starts

`<parent>` is one per appliance home, `appliance-<8 hex digits of the home's path hash>`, so
two appliances on one host (two `--home`s) never share a slot's cgroup (nor find, stop or
remove each other's); the home is $APPLIANCE_HOME, which the CLI and every program it renders
set. The environment variable APPLIANCE_CGROUP_PARENT overrides it (tests use a unique one; a
systemd-delegated setup may use a nested path).

Processes sit only in the two leaves: cgroup v2 allows processes only in leaves once
controllers are enabled, and `memory.oom.group=1` on the job leaf kills the whole workload on
OOM but never the runner. On v1 the same layout keeps the OOM count per job.

`join_runner`/`join_job` are meant to run as a subprocess `preexec_fn`, so this module imports
nothing heavy (no pathlib, no dataclasses) and caches the detected hierarchy.
"""

from __future__ import annotations

import errno
import os

from appliance.slot.cgroup import v1, v2
from appliance.slot.cgroup.base import (  # noqa: F401  (the package's surface)
    CGROUP_MOUNTINFO, DEFAULT_PARENT, FIX_NO_CGROUPS, FIX_PERMISSION, FIX_READ_ONLY, HOME_ENV, LEAVES, PARENT_ENV,
    RUNNER_PIDS,
    PARENT_FILE, CgroupError, Hierarchy, _check_slot_name, _error, _read_or, _write, cgroup_parent,
    cgroup_version, current_hierarchy, enter_leaf, home_parent, systemd_delegated_cgroup, use_recorded_parent,
)


# --------------------------------------------------------------------------- the slot


class SlotCgroup:
    """The cgroup directories of one slot, in every hierarchy we use."""

    __slots__ = ("slot", "hierarchy", "parent")

    def __init__(self, slot: str, hierarchy: Hierarchy | None = None, parent: str | None = None):
        _check_slot_name(slot)
        self.slot = slot
        self.hierarchy = hierarchy or current_hierarchy()
        self.parent = cgroup_parent() if parent is None else parent.strip("/")

    def __repr__(self) -> str:
        return f"SlotCgroup({self.slot!r}, {self.hierarchy!r}, parent={self.parent!r})"

    def path(self, root: str, leaf: str | None = None) -> str:
        """The slot directory (or one leaf) below one cgroupfs mount point."""
        parts = [root, self.parent, self.slot] + ([leaf] if leaf else [])
        return os.path.join(*parts)

    @property
    def cpuset_dir(self) -> str:
        return self.path(self.hierarchy.cpuset)

    @property
    def memory_dir(self) -> str:
        return self.path(self.hierarchy.memory)

    # ---- setup

    def setup(self, cpus: list[int], mems: list[int], memory_bytes: int, pids_max: int | None = None) -> "SlotCgroup":
        """Create the slot and its leaves with these limits; on an existing slot, update them.

        `pids_max` bounds the processes and threads of a job (the slot gets RUNNER_PIDS more,
        for its runner); None: no bound. Without the pids controller there is none either.
        """
        if not cpus:
            raise ValueError("a slot needs at least one CPU")
        if not mems:
            raise ValueError("a slot needs at least one memory node (mems), e.g. [0]")
        if not isinstance(memory_bytes, int) or memory_bytes <= 0:
            raise ValueError(f"memory limit must be a positive number of bytes, not {memory_bytes!r}")
        if pids_max is not None and (not isinstance(pids_max, int) or pids_max <= 0):
            raise ValueError(f"the pids bound must be a positive number, not {pids_max!r}")
        self._version().setup(self, cpus, mems, memory_bytes, pids_max)
        return self

    def fresh_job(self, memory_bytes: int | None = None, keep: int | None = None) -> None:
        """Replace the job leaf with a new, empty one, so what a job is charged (its peak memory,
        its OOM kills, the page cache it touches) starts at zero and no earlier job's or
        environment build's count comes along.

        `memory_bytes` limits the new leaf (the request's `ram`; None: the slot's limit holds,
        and it bounds any larger value too); the pids bound carries over. Whatever is left in the
        old leaf is killed first, except `keep` (the waiting launcher process): it waits in the
        runner leaf meanwhile (its memory stays charged to the slot) and joins the new leaf.
        Needs root (rmdir and mkdir in the slot); CgroupError when that fails.
        """
        if memory_bytes is not None and (not isinstance(memory_bytes, int) or memory_bytes <= 0):
            raise ValueError(f"memory limit must be a positive number of bytes, not {memory_bytes!r}")
        version = self._version()
        bound = version.pids_dir(self, "job")
        pids_max = _read_or(os.path.join(bound, "pids.max"), "") if bound else ""
        owner = _owner(os.path.join(self.path(self.hierarchy.cpuset, "job"), "cgroup.procs"))
        if keep:
            self.join("runner", keep)
        self._remove_job()
        version.make_job(self, memory_bytes, pids_max or None)
        if owner:  # the leaf was handed to a runner that dropped root: hand the new one too
            self.delegate_job(*owner)
        if keep:
            self.join("job", keep)

    def limit_job(self, memory_bytes: int) -> None:
        """Lower the memory limit of the job leaf made by `fresh_job(None)` (the request's `ram`)."""
        if not isinstance(memory_bytes, int) or memory_bytes <= 0:
            raise ValueError(f"memory limit must be a positive number of bytes, not {memory_bytes!r}")
        self._version().limit_job(self, memory_bytes)

    def _remove_job(self, tries: int = 200) -> None:
        """Kill what is in the job leaf and rmdir it everywhere (a killed process takes a moment
        to leave its cgroup: retried for about two seconds)."""
        import time

        paths = [self.path(root, "job") for root in self.hierarchy.roots()]
        accounting = self._cpuacct_root()
        for attempt in range(tries):
            self.kill_leaf("job")
            busy = []
            for path in paths:
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    if err.errno not in (errno.EBUSY, errno.ENOTEMPTY) or attempt == tries - 1:
                        raise _error("remove cgroup", path, err) from None
                    busy.append(path)
            if not busy:
                break
            paths = busy
            time.sleep(0.01)
        if accounting:
            try:
                os.rmdir(self.path(accounting, "job"))
            except OSError:
                pass  # CPU accounting only

    def _version(self):
        """The module (v1 or v2) that knows this hierarchy's files."""
        return v2 if self.hierarchy.version == "v2" else v1

    def _cpuacct_root(self) -> str | None:
        """v1: the cpuacct mount when it is one more hierarchy to keep the slot in, else None."""
        return None if self.hierarchy.version == "v2" else v1.cpuacct_root(self)

    def _parent_dirs(self, root: str) -> list[str]:
        """Every directory from the mount point down to the slot's parent, top first."""
        dirs = [root]
        for part in self.parent.split("/"):
            dirs.append(os.path.join(dirs[-1], part))
        return dirs

    # ---- processes

    def join(self, leaf: str, pid: int | None = None) -> None:
        """Move a process (default: the caller) into one leaf in every hierarchy."""
        if leaf not in LEAVES:
            raise ValueError(f"unknown leaf {leaf!r}; use one of {LEAVES}")
        text = str(pid or os.getpid())
        for root in self.hierarchy.roots():
            _write(os.path.join(self.path(root, leaf), "cgroup.procs"), text)
        accounting = self._cpuacct_root()
        if accounting is not None:  # CPU accounting only: never fails the join
            try:
                with open(os.path.join(self.path(accounting, leaf), "cgroup.procs"), "w") as f:
                    f.write(text)
            except OSError:
                pass

    def delegate_job(self, uid: int, gid: int) -> None:
        """Let a process of user uid move itself into the job leaf (the runner after it dropped root).

        v1 checks write access to the target's cgroup.procs (or tasks); v2 checks the target's
        and the common ancestor's (the slot's). Limit files stay root's, so the user cannot
        raise its own limits.
        """
        for root in self.hierarchy.roots():
            for path in self._version().delegated_files(self, root):
                try:
                    os.chown(path, uid, gid)
                except OSError as err:
                    raise _error(f"hand to uid {uid}:", path, err) from None
        accounting = self._cpuacct_root()
        for name in ("cgroup.procs", "tasks") if accounting else ():
            try:
                os.chown(os.path.join(self.path(accounting, "job"), name), uid, gid)
            except OSError:
                pass  # CPU accounting only

    def kill_leaf(self, leaf: str, rounds: int = 20) -> int:
        """SIGKILL every process in one leaf (a fork racing the kill is caught in the next
        round); returns how many were killed."""
        import signal
        import time

        killed = 0
        for _ in range(rounds):
            pids = set()
            for root in self.hierarchy.roots():
                text = _read_or(os.path.join(self.path(root, leaf), "cgroup.procs"), "")
                pids.update(int(p) for p in text.split() if p.isdigit())
            pids.discard(os.getpid())
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        return killed

    def pids(self) -> list[int]:
        """Processes in the slot (both leaves and, by mistake, the slot itself), sorted."""
        found: set[int] = set()
        for root in self.hierarchy.roots():
            for leaf in (None,) + LEAVES:
                text = _read_or(os.path.join(self.path(root, leaf), "cgroup.procs"), "")
                found.update(int(p) for p in text.split() if p.isdigit())
        return sorted(found)

    # ---- accounting

    def oom_kills(self) -> int:
        """OOM kills of processes in the job leaf; 0 when unknown."""
        return self._version().oom_kills(self.path(self.hierarchy.memory, "job")) or 0

    def memory_usage(self) -> int | None:
        """Bytes charged to the whole slot (runner, job and its /dev/shm pages), or None."""
        text = _read_or(os.path.join(self.memory_dir, self._version().USAGE_FILE), "")
        return int(text) if text.isdigit() else None

    def memory_limit(self) -> int | None:
        """The slot's memory limit in bytes, or None when unknown or unlimited."""
        text = _read_or(os.path.join(self.memory_dir, self._version().LIMIT_FILE), "")
        return int(text) if text.isdigit() else None

    def cpu_seconds(self) -> float | None:
        """CPU time used by the slot since its cgroup was made (v2 cpu.stat, v1 cpuacct.usage), or None."""
        return self._version().cpu_seconds(self)

    # ---- removal

    def remove(self) -> None:
        """rmdir the leaves, then the slot, in every hierarchy; missing ones are fine."""
        busy = []
        for root in self.hierarchy.roots():
            for path in [self.path(root, leaf) for leaf in LEAVES] + [self.path(root)]:
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    if err.errno in (errno.EBUSY, errno.ENOTEMPTY):
                        busy.append(path)
                    else:
                        raise _error("remove cgroup", path, err) from None
        accounting = self._cpuacct_root()
        for path in [self.path(accounting, leaf) for leaf in LEAVES] + [self.path(accounting)] if accounting else ():
            try:
                os.rmdir(path)
            except OSError:
                pass  # CPU accounting only
        if busy:
            pids = self.pids()
            raise CgroupError(
                f"cannot remove the cgroups of slot {self.slot}: {', '.join(busy)} still "
                f"in use (processes: {pids or 'none, but a sub-cgroup remains'}); "
                "fix: stop the slot's processes first"
            )





def _owner(path: str) -> tuple[int, int] | None:
    """(uid, gid) of a file when it is not root's, else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_uid, st.st_gid) if st.st_uid != 0 else None


# --------------------------------------------------------------------------- module API


def setup_slot(
    slot: str, cpus: list[int], mems: list[int], memory_bytes: int, hierarchy: Hierarchy | None = None,
    pids_max: int | None = None,
) -> SlotCgroup:
    """Create (or update) the slot cgroup and its runner/job leaves with these limits."""
    return SlotCgroup(slot, hierarchy).setup(cpus, mems, memory_bytes, pids_max)


def join_runner(slot: str, hierarchy: Hierarchy | None = None) -> None:
    """Move the calling process into the slot's runner leaf."""
    SlotCgroup(slot, hierarchy).join("runner")


def join_job(slot: str, hierarchy: Hierarchy | None = None) -> None:
    """Move the calling process into the slot's job leaf (use as a subprocess preexec_fn)."""
    SlotCgroup(slot, hierarchy).join("job")


def slot_pids(slot: str, hierarchy: Hierarchy | None = None) -> list[int]:
    return SlotCgroup(slot, hierarchy).pids()


def oom_kills(slot: str, hierarchy: Hierarchy | None = None) -> int:
    """OOM kills counted in the slot's job leaf; 0 when unknown (including: no cgroups)."""
    try:
        return SlotCgroup(slot, hierarchy).oom_kills()
    except CgroupError:
        return 0


def memory_usage(slot: str, hierarchy: Hierarchy | None = None) -> int | None:
    """Bytes used by the whole slot cgroup, or None when unknown (for `appliance status`)."""
    try:
        return SlotCgroup(slot, hierarchy).memory_usage()
    except CgroupError:
        return None


def cpu_seconds(slot: str, hierarchy: Hierarchy | None = None) -> float | None:
    """CPU seconds the slot's cgroup has used, or None when unknown (for metrics)."""
    try:
        return SlotCgroup(slot, hierarchy).cpu_seconds()
    except (CgroupError, OSError):
        return None


def remove_slot(slot: str, hierarchy: Hierarchy | None = None) -> None:
    """Remove the slot's cgroups; CgroupError if processes remain."""
    SlotCgroup(slot, hierarchy).remove()


def prune(keep: set[str], hierarchy: Hierarchy | None = None) -> list[str]:
    """Remove empty slot cgroups whose name is not in keep; returns the names removed.

    Slots that still hold processes are left alone (a draining slot is not ours to kill).
    """
    hierarchy = hierarchy or current_hierarchy()
    parent = cgroup_parent()
    names: set[str] = set()
    for root in hierarchy.roots():
        base = os.path.join(root, parent)
        try:
            names.update(e.name for e in os.scandir(base) if e.is_dir())
        except FileNotFoundError:
            pass
    removed = []
    for name in sorted(names - set(keep)):
        cg = SlotCgroup(name, hierarchy, parent)
        if cg.pids():
            continue
        try:
            cg.remove()
        except CgroupError:
            continue  # a process arrived meanwhile, or a foreign sub-cgroup: leave it
        removed.append(name)
    return removed
