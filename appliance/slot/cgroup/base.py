"""What cgroup v1 and v2 share: finding the hierarchy, where an appliance's slots live, the
file helpers that turn every failed cgroupfs write into one line naming the fix.

Imported by a subprocess `preexec_fn` (join_job), so it imports nothing heavy.
"""

from __future__ import annotations

import errno
import os

from appliance.sha256 import sha256
from appliance.slot.limits import format_cpu_list, parse_cpu_list

CGROUP_MOUNTINFO = "/proc/self/mountinfo"
PARENT_ENV = "APPLIANCE_CGROUP_PARENT"
PARENT_FILE = "cgroup-parent"  # in HOME/run: the parent `up` chose, for every later command
HOME_ENV = "APPLIANCE_HOME"
DEFAULT_PARENT = "appliance"  # with no home known (a slot tool run by hand)
LEAVES = ("runner", "job")
RUNNER_PIDS = 256  # what the slot may have beyond its job's pids bound: the runner's own threads

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
    `pids`, when mounted, bounds a slot's processes (a slot without it has no such bound).
    v2: one unified mount point (its cpu.stat counts CPU time; the pids controller is used when
    it is available there). Tests build one on a fake tree.
    """

    __slots__ = ("version", "cpuset", "memory", "cpuacct", "pids")

    def __init__(self, version: str, cpuset: str, memory: str, cpuacct: str | None = None,
                 pids: str | None = None):
        self.version = version
        self.cpuset = cpuset
        self.memory = memory
        self.cpuacct = cpuacct
        self.pids = pids

    @classmethod
    def v1(cls, cpuset: str, memory: str, cpuacct: str | None = None, pids: str | None = None) -> "Hierarchy":
        return cls("v1", cpuset, memory, cpuacct, pids)

    @classmethod
    def v2(cls, root: str) -> "Hierarchy":
        return cls("v2", root, root)

    @classmethod
    def detect(cls, mountinfo: str = CGROUP_MOUNTINFO) -> "Hierarchy":
        """Prefer v1 cpuset+memory when mounted (hybrid hosts keep them there), else v2."""
        v1, v2 = _cgroup_mounts(mountinfo)
        if "cpuset" in v1 and "memory" in v1:
            return cls.v1(v1["cpuset"], v1["memory"], v1.get("cpuacct"), v1.get("pids"))
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
        """The distinct mount points we create slot directories in (and move processes in)."""
        roots = [self.cpuset]
        for root in (self.memory, self.pids):
            if root and root not in roots:
                roots.append(root)
        return roots

    def __repr__(self) -> str:
        if self.version == "v2":
            return f"Hierarchy.v2({self.cpuset!r})"
        return (f"Hierarchy.v1(cpuset={self.cpuset!r}, memory={self.memory!r}, cpuacct={self.cpuacct!r}, "
                f"pids={self.pids!r})")


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
    digest = sha256(os.path.realpath(home).encode()).hexdigest()
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
