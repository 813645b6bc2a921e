"""Slot cgroups on cgroup v1 and v2.

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
import hashlib
import os

from appliance.slot.limits import format_cpu_list, parse_cpu_list

CGROUP_MOUNTINFO = "/proc/self/mountinfo"
PARENT_ENV = "APPLIANCE_CGROUP_PARENT"
PARENT_FILE = "cgroup-parent"  # in HOME/run: the parent `up` chose, for every later command
HOME_ENV = "APPLIANCE_HOME"
DEFAULT_PARENT = "appliance"  # with no home known (a slot tool run by hand)
LEAVES = ("runner", "job")

FIX_PERMISSION = (
    "run as root (sudo ./install.sh) or give the appliance a delegated cgroup "
    "(systemd Delegate=yes)"
)
FIX_READ_ONLY = (
    "the cgroup filesystem is mounted read-only (usual inside a container): run the "
    "appliance on the host, or use the docker backend"
)
FIX_NO_CGROUPS = (
    "mount cgroupfs with the cpuset and memory controllers (any systemd host has them), "
    "or use the docker backend"
)


class CgroupError(RuntimeError):
    """A cgroup operation failed; the message names the path, the cause and the fix."""


# --------------------------------------------------------------------------- detection


def _cgroup_mounts(mountinfo: str = CGROUP_MOUNTINFO) -> tuple[dict[str, str], list[str]]:
    """Return ({v1 controller: mount point}, [cgroup2 mount points]) from a mountinfo file."""
    v1: dict[str, str] = {}
    v2: list[str] = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if "-" not in fields:
                continue
            sep = fields.index("-")
            if len(fields) < sep + 4:
                continue
            mount_point = _unescape(fields[4])
            fstype, super_options = fields[sep + 1], fields[sep + 3]
            if fstype == "cgroup2":
                v2.append(mount_point)
            elif fstype == "cgroup":
                for option in super_options.split(","):
                    if option not in ("rw", "ro") and "=" not in option:
                        v1.setdefault(option, mount_point)
    return v1, v2


def _unescape(path: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \040, \011, \012, \134.
    if "\\" not in path:
        return path
    return path.encode().decode("unicode_escape")


def cgroup_version(mountinfo: str = CGROUP_MOUNTINFO) -> str:
    """"v1", "v2", "hybrid" (v1 controllers plus a cgroup2 mount), or "none" (no cgroupfs)."""
    v1, v2 = _cgroup_mounts(mountinfo)
    if v1 and v2:
        return "hybrid"
    if v1:
        return "v1"
    if v2:
        return "v2"
    return "none"


class Hierarchy:
    """Where the cpuset and memory controllers are mounted.

    v1: one mount point per controller (the same path when they are co-mounted); `cpuacct`,
    when mounted, only counts the slot's CPU time (best effort: a slot works without it).
    v2: one unified mount point (its cpu.stat counts CPU time). Tests build one on a fake tree.
    """

    __slots__ = ("version", "cpuset", "memory", "cpuacct")

    def __init__(self, version: str, cpuset: str, memory: str, cpuacct: str | None = None):
        self.version = version
        self.cpuset = cpuset
        self.memory = memory
        self.cpuacct = cpuacct

    @classmethod
    def v1(cls, cpuset: str, memory: str, cpuacct: str | None = None) -> "Hierarchy":
        return cls("v1", cpuset, memory, cpuacct)

    @classmethod
    def v2(cls, root: str) -> "Hierarchy":
        return cls("v2", root, root)

    @classmethod
    def detect(cls, mountinfo: str = CGROUP_MOUNTINFO) -> "Hierarchy":
        """Prefer v1 cpuset+memory when mounted (hybrid hosts keep them there), else v2."""
        v1, v2 = _cgroup_mounts(mountinfo)
        if "cpuset" in v1 and "memory" in v1:
            return cls.v1(v1["cpuset"], v1["memory"], v1.get("cpuacct"))
        for root in sorted(v2, key=len):
            if {"cpuset", "memory"} <= set(_read_or(os.path.join(root, "cgroup.controllers"), "").split()):
                return cls.v2(root)
        if v2 or v1:
            raise CgroupError(
                f"the cpuset and memory controllers are not both available (v1 mounted: "
                f"{sorted(v1) or 'none'}; cgroup2 at {v2 or 'none'}); fix: {FIX_NO_CGROUPS}"
            )
        raise CgroupError(f"no cgroup filesystem is mounted (see {mountinfo}); fix: {FIX_NO_CGROUPS}")

    def roots(self) -> list[str]:
        """The distinct mount points we create slot directories in."""
        return [self.cpuset] if self.cpuset == self.memory else [self.cpuset, self.memory]

    def __repr__(self) -> str:
        if self.version == "v2":
            return f"Hierarchy.v2({self.cpuset!r})"
        return f"Hierarchy.v1(cpuset={self.cpuset!r}, memory={self.memory!r}, cpuacct={self.cpuacct!r})"


_detected: Hierarchy | None = None


def current_hierarchy() -> Hierarchy:
    """The host's hierarchy, detected once per process."""
    global _detected
    if _detected is None:
        _detected = Hierarchy.detect()
    return _detected


def cgroup_parent(home: str | None = None) -> str:
    """The directory (relative to each cgroupfs mount) that holds the slot cgroups of the
    appliance at `home` (default: $APPLIANCE_HOME); $APPLIANCE_CGROUP_PARENT overrides it."""
    parent = os.environ.get(PARENT_ENV, "").strip().strip("/")
    if not parent:
        return home_parent(home or os.environ.get(HOME_ENV, ""))
    if any(part in ("", ".", "..") for part in parent.split("/")):
        raise CgroupError(f"{PARENT_ENV}={parent!r} is not a plain relative cgroup path; fix: use e.g. 'appliance'")
    return parent


def systemd_delegated_cgroup(proc_cgroup: str = "/proc/self/cgroup") -> str | None:
    """Our own cgroup, relative to the mount (e.g. "system.slice/appliance.service"), when systemd
    runs us as a service on a cgroup v2 host; None otherwise (v1/hybrid, no systemd, a shell).

    The unit has Delegate=yes, so that subtree is ours: slots belong below it, where `systemctl
    stop/kill` reaches them, not beside it in the root cgroup. INVOCATION_ID is set by systemd
    for every service it starts (and by nothing else).
    """
    if not os.environ.get("INVOCATION_ID"):
        return None
    try:
        if current_hierarchy().version != "v2":
            return None
    except CgroupError:
        return None
    for line in _read_or(proc_cgroup, "").splitlines():
        if line.startswith("0::"):
            return line[3:].strip().strip("/") or None
    return None


def enter_leaf(parent: str, leaf: str, hierarchy: Hierarchy | None = None) -> str:
    """Move the calling process into <parent>/<leaf> (made if missing); returns that directory.

    cgroup v2 allows no processes in a cgroup that enables controllers for its children
    (writing cgroup.subtree_control fails with EBUSY), so the supervisor leaves the delegated
    cgroup systemd started it in before any slot is made beside it.
    """
    root = (hierarchy or current_hierarchy()).cpuset
    path = os.path.join(root, parent, leaf)
    _mkdir(path)
    _write(os.path.join(path, "cgroup.procs"), str(os.getpid()))
    return path


def use_recorded_parent(run_dir: str) -> None:
    """Let this command find the slot cgroups where the running appliance put them
    (HOME/run/cgroup-parent, written by `up`), unless APPLIANCE_CGROUP_PARENT says otherwise."""
    if os.environ.get(PARENT_ENV):
        return
    parent = _read_or(os.path.join(run_dir, PARENT_FILE), "")
    if parent:
        os.environ[PARENT_ENV] = parent


def home_parent(home: str) -> str:
    """`appliance-<hash>` for the appliance home `home` (any spelling of its path)."""
    if not home:
        return DEFAULT_PARENT
    digest = hashlib.sha256(os.path.realpath(home).encode()).hexdigest()
    return f"{DEFAULT_PARENT}-{digest[:8]}"


# --------------------------------------------------------------------------- file helpers


def _fix_for(path: str, err: OSError) -> str:
    name = os.path.basename(path)
    code = err.errno
    if code in (errno.EACCES, errno.EPERM):
        return FIX_PERMISSION
    if code == errno.EROFS:
        return FIX_READ_ONLY
    if code == errno.ENOSPC and name in ("cgroup.procs", "tasks"):
        return ("cpuset.cpus and cpuset.mems must be set on this cgroup and every level above it first "
                "(setup_slot does this)")
    if code == errno.ENOENT:
        return ("the cgroup does not exist or the controller is not mounted: set the slot up first "
                "(setup_slot / the exec wrapper)")
    if code == errno.EBUSY and name == "cgroup.subtree_control":
        return (
            "that cgroup holds processes itself (cgroup v2 allows processes only in leaves): "
            f"move them into a child cgroup, or point {PARENT_ENV} at a cgroup without processes"
        )
    if code == errno.EBUSY and name.startswith("memory."):
        return "the cgroup already uses more memory than the new limit: stop its processes or choose a larger limit"
    if code == errno.EBUSY and name.startswith("cpuset."):
        return "a child cgroup still uses CPUs or memory nodes outside the new set"
    if code == errno.EINVAL and name.startswith("cpuset."):
        return "the value must be a subset of the parent cgroup's cpuset (and of the online CPUs)"
    if code in (errno.EOPNOTSUPP, errno.EINVAL) and name == "cgroup.subtree_control":
        return "the controller is not available in the parent cgroup; enable it there (systemd Delegate=yes)"
    return "check the cgroup setup (/proc/self/mountinfo, /proc/self/cgroup)"


def _error(action: str, path: str, err: OSError) -> CgroupError:
    cause = err.strerror or str(err)
    return CgroupError(f"cannot {action} {path}: {cause}; fix: {_fix_for(path, err)}")


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as err:
        raise _error(f"write {value!r} to", path, err) from None


def _write_optional(path: str, value: str) -> bool:
    """Write a file that some kernels lack (e.g. swap accounting off); False if missing."""
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError as err:
        # cgroupfs cannot create files: a missing one shows up as EACCES or ENOENT.
        if os.path.exists(path):
            raise _error(f"write {value!r} to", path, err) from None
        return False


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as err:
        raise _error("read", path, err) from None


def _read_or(path: str, default: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _mkdir(path: str) -> bool:
    """Create one cgroup directory; True if it was new."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        raise _error("create cgroup", path, err) from None


def _keyed_value(text: str, key: str) -> int | None:
    """The number after `key` in "key value" lines (memory.events, memory.oom_control)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return None


def _check_slot_name(slot: str) -> None:
    if not slot or "/" in slot or slot in (".", "..") or slot != slot.strip():
        raise ValueError(f"bad slot name {slot!r}: use a plain name like 'slot-0'")


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

    def setup(self, cpus: list[int], mems: list[int], memory_bytes: int) -> "SlotCgroup":
        """Create the slot and its leaves with these limits; on an existing slot, update them."""
        if not cpus:
            raise ValueError("a slot needs at least one CPU")
        if not mems:
            raise ValueError("a slot needs at least one memory node (mems), e.g. [0]")
        if not isinstance(memory_bytes, int) or memory_bytes <= 0:
            raise ValueError(f"memory limit must be a positive number of bytes, not {memory_bytes!r}")
        if self.hierarchy.version == "v2":
            self._setup_v2(cpus, mems, memory_bytes)
        else:
            self._setup_v1_cpuset(cpus, mems)
            self._setup_v1_memory(memory_bytes)
            self._setup_v1_cpuacct()
        return self

    def _cpuacct_root(self) -> str | None:
        """v1: the cpuacct mount when it is one more hierarchy to keep the slot in, else None."""
        root = self.hierarchy.cpuacct
        if self.hierarchy.version == "v2" or not root or root in self.hierarchy.roots():
            return None
        return root

    def _setup_v1_cpuacct(self) -> None:
        """The slot and its leaves in the cpuacct hierarchy too, to count its CPU time; a
        failure only costs that count."""
        root = self._cpuacct_root()
        if root is None:
            return
        try:
            for here in self._parent_dirs(root)[1:] + [self.path(root)] + [self.path(root, leaf) for leaf in LEAVES]:
                _mkdir(here)
        except CgroupError:
            pass

    def _parent_dirs(self, root: str) -> list[str]:
        """Every directory from the mount point down to the slot's parent, top first."""
        dirs = [root]
        for part in self.parent.split("/"):
            dirs.append(os.path.join(dirs[-1], part))
        return dirs

    def _setup_v1_cpuset(self, cpus: list[int], mems: list[int]) -> None:
        # An empty cpuset.cpus/mems anywhere on the way makes adding a pid fail with ENOSPC,
        # so intermediate levels copy their parent's (the widest) sets.
        dirs = self._parent_dirs(self.hierarchy.cpuset)
        for above, here in zip(dirs, dirs[1:]):
            _mkdir(here)
            for name in ("cpuset.cpus", "cpuset.mems"):
                wanted = _read(os.path.join(above, name))
                if _read(os.path.join(here, name)) != wanted:
                    _write(os.path.join(here, name), wanted)
        _check_subset(cpus, os.path.join(dirs[-1], "cpuset.cpus"), "CPU")
        _check_subset(mems, os.path.join(dirs[-1], "cpuset.mems"), "memory node")
        slot_dir = self.cpuset_dir
        _mkdir(slot_dir)
        leaves = [self.path(self.hierarchy.cpuset, leaf) for leaf in LEAVES]
        for leaf in leaves:
            _mkdir(leaf)
        _set_cpuset_v1(slot_dir, leaves, "cpuset.cpus", cpus)
        _set_cpuset_v1(slot_dir, leaves, "cpuset.mems", mems)

    def _setup_v1_memory(self, memory_bytes: int) -> None:
        for here in self._parent_dirs(self.hierarchy.memory)[1:] + [self.memory_dir]:
            if _mkdir(here):
                _use_hierarchy_v1(here)
        for leaf in LEAVES:
            _mkdir(self.path(self.hierarchy.memory, leaf))
        slot_dir = self.memory_dir
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

    def _setup_v2(self, cpus: list[int], mems: list[int], memory_bytes: int) -> None:
        root = self.hierarchy.cpuset
        available = _read(os.path.join(root, "cgroup.controllers")).split()
        missing = [c for c in ("cpuset", "memory") if c not in available]
        if missing:
            raise CgroupError(
                f"cgroup v2 at {root} lacks the {' and '.join(missing)} controller; fix: {FIX_NO_CGROUPS}"
            )
        dirs = self._parent_dirs(root) + [self.cpuset_dir]
        # Each level enables the controllers for its children; the slot enables them for
        # its leaves, so job/memory.events and job/memory.oom.group exist.
        for here, below in zip(dirs, dirs[1:]):
            _enable_controllers_v2(here)
            _mkdir(below)
        slot_dir = dirs[-1]
        for leaf in LEAVES:
            _mkdir(self.path(root, leaf))
        _enable_controllers_v2(slot_dir)
        _check_subset(cpus, os.path.join(dirs[-2], "cpuset.cpus.effective"), "CPU")
        _check_subset(mems, os.path.join(dirs[-2], "cpuset.mems.effective"), "memory node")
        _write(os.path.join(slot_dir, "cpuset.cpus"), format_cpu_list(cpus))
        _write(os.path.join(slot_dir, "cpuset.mems"), format_cpu_list(mems))
        _write(os.path.join(slot_dir, "memory.max"), str(memory_bytes))
        _write_optional(os.path.join(slot_dir, "memory.swap.max"), "0")
        _write(os.path.join(self.path(root, "job"), "memory.oom.group"), "1")

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
            files = [os.path.join(self.path(root, "job"), "cgroup.procs")]
            if self.hierarchy.version == "v2":
                files.append(os.path.join(self.path(root), "cgroup.procs"))
            else:
                files.append(os.path.join(self.path(root, "job"), "tasks"))
            for path in files:
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
        job = self.path(self.hierarchy.memory, "job")
        name = "memory.events" if self.hierarchy.version == "v2" else "memory.oom_control"
        return _keyed_value(_read_or(os.path.join(job, name), ""), "oom_kill") or 0

    def memory_usage(self) -> int | None:
        """Bytes charged to the whole slot (runner, job and its /dev/shm pages), or None."""
        name = "memory.current" if self.hierarchy.version == "v2" else "memory.usage_in_bytes"
        text = _read_or(os.path.join(self.memory_dir, name), "")
        return int(text) if text.isdigit() else None

    def cpu_seconds(self) -> float | None:
        """CPU time used by the slot since its cgroup was made (v2 cpu.stat, v1 cpuacct.usage), or None."""
        if self.hierarchy.version == "v2":
            usec = _keyed_value(_read_or(os.path.join(self.cpuset_dir, "cpu.stat"), ""), "usage_usec")
            return usec / 1e6 if usec is not None else None
        if not self.hierarchy.cpuacct:
            return None
        text = _read_or(os.path.join(self.path(self.hierarchy.cpuacct), "cpuacct.usage"), "")
        return int(text) / 1e9 if text.isdigit() else None

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


def _check_subset(wanted: list[int], allowed_file: str, what: str) -> None:
    if not os.path.exists(allowed_file):
        return  # e.g. a fake tree in tests: let the kernel judge the write
    text = _read(allowed_file)
    allowed = parse_cpu_list(text)
    extra = sorted(set(wanted) - set(allowed))
    if extra:
        raise CgroupError(
            f"{what} {format_cpu_list(extra)} is not available here: {allowed_file} allows "
            f"{text or 'nothing'}; fix: choose from {text or '(none)'}"
        )


def _set_cpuset_v1(slot_dir: str, leaves: list[str], name: str, wanted: list[int]) -> None:
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


def _use_hierarchy_v1(path: str) -> None:
    """Old kernels default to memory.use_hierarchy=0, where a child escapes its parent's limit."""
    flag = os.path.join(path, "memory.use_hierarchy")
    if _read_or(flag, "1") == "0":
        _write(flag, "1")


def _enable_controllers_v2(path: str) -> None:
    control = os.path.join(path, "cgroup.subtree_control")
    enabled = _read_or(control, "").split()
    missing = [c for c in ("cpuset", "memory") if c not in enabled]
    if missing:
        _write(control, " ".join("+" + c for c in missing))


# --------------------------------------------------------------------------- module API


def setup_slot(
    slot: str, cpus: list[int], mems: list[int], memory_bytes: int, hierarchy: Hierarchy | None = None
) -> SlotCgroup:
    """Create (or update) the slot cgroup and its runner/job leaves with these limits."""
    return SlotCgroup(slot, hierarchy).setup(cpus, mems, memory_bytes)


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
