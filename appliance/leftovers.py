"""What a supervisord that died left running, and stopping it the way `appliance down` would.

supervisord's children outlive it (SIGKILL, OOM, a crash): runners keep their jobs, the store
keeps its ports, the controller keeps watching. They are found by the lock each one holds
(HOME/run/locks/NAME.lock, appliance/singleton.py) and, for runners started before there were
locks, by the slots' cgroups. They stop in `down`'s order: the controller (so it re-adds
nothing), then every runner at once with SIGTERM (each drains: finishes its job or puts it back,
within runner.drain_timeout, and uploads), SIGKILL after the drain wait, then what is left in
the slot cgroups, then the store (last: the draining runners upload to it).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

from appliance import singleton
from appliance.paths import Home

CONTROLLER_WAIT_S = 10.0  # as its stopwaitsecs
STORE_WAIT_S = 20.0


@dataclass
class Leftovers:
    """Pids still running, by program name (slot-N, controller, store)."""

    holders: dict[str, list[int]] = field(default_factory=dict)  # hold the program's lock
    cgroup: dict[str, list[int]] = field(default_factory=dict)  # in the slot's cgroup (runner or job)

    def names(self) -> list[str]:
        return sorted(set(self.holders) | set(self.cgroup))

    def pids(self) -> list[int]:
        return sorted({p for pids in (*self.holders.values(), *self.cgroup.values()) for p in pids})

    def describe(self) -> str:
        def pids(name):
            return ", ".join(map(str, sorted(set(self.holders.get(name, []) + self.cgroup.get(name, [])))))

        return ", ".join(f"{n} (pid {pids(n)})" for n in self.names())

    def __bool__(self) -> bool:
        return bool(self.pids())


def find(home: Home, slots: list[str] = ()) -> Leftovers:
    """Holders of the locks in HOME/run/locks, and processes in the cgroups of `slots` (and of
    every slot with a lock file). Call only while this home's supervisord is not running."""
    found = Leftovers()
    locks = home.run_dir / "locks"
    names = set(slots)
    for lock in sorted(locks.glob("*.lock")) if locks.is_dir() else ():
        names.add(lock.stem)
        pids = singleton.holders(str(lock)) if singleton.is_held(str(lock)) else []  # the probe is cheap
        if pids:
            found.holders[lock.stem] = pids
    for name in sorted(names - {"controller", "store", "api"}):
        pids = _cgroup_pids(home, name)
        if pids:
            found.cgroup[name] = pids
    return found


def _slot_cgroup(home: Home, slot: str):
    """This home's cgroup of `slot` (another appliance on the host may have a slot of that name)."""
    from appliance.slot.cgroup import SlotCgroup, cgroup_parent

    return SlotCgroup(slot, parent=cgroup_parent(str(home.root)))


def _cgroup_pids(home: Home, slot: str) -> list[int]:
    if os.geteuid() != 0:
        return []  # process slots need root; without it there are no slot cgroups of ours
    from appliance.slot.cgroup import CgroupError

    try:
        return [p for p in _slot_cgroup(home, slot).pids() if _alive(p)]
    except (CgroupError, ValueError, OSError):
        return []


def stop(home: Home, leftovers: Leftovers, drain_wait: float, say=print) -> None:
    """Stop `leftovers` gently, in order (see the module doc). PermissionError if not ours to signal."""
    if not leftovers:
        return
    slots = [n for n in leftovers.names() if n not in ("controller", "store", "api")]
    say(f"supervisord is gone, but these still run: {leftovers.describe()}; stopping them "
        f"(runners drain first, up to {drain_wait:.0f}s)")
    _term_and_wait(leftovers.holders.get("controller", []) + leftovers.holders.get("api", []), CONTROLLER_WAIT_S)
    runners = []
    for name in slots:
        # the lock holder is the runner (or its docker wrapper); without one, a runner from
        # before there were locks sits in the cgroup's runner leaf
        runners += leftovers.holders.get(name) or _runner_leaf(home, name)
    _term_and_wait(runners, drain_wait)
    rest = [p for name in slots for p in _cgroup_pids(home, name)]  # workloads whose runner is gone
    _term_and_wait(rest, 0)
    _term_and_wait(leftovers.holders.get("store", []), STORE_WAIT_S)


def _runner_leaf(home: Home, slot: str) -> list[int]:
    if os.geteuid() != 0:
        return []
    from appliance.slot.cgroup import CgroupError

    try:
        cg = _slot_cgroup(home, slot)
        with open(os.path.join(cg.path(cg.hierarchy.cpuset, "runner"), "cgroup.procs")) as f:
            text = f.read()
    except (CgroupError, ValueError, OSError):
        return []
    return [int(p) for p in text.split() if p.isdigit() and _alive(int(p))]


def _term_and_wait(pids: list[int], wait_s: float) -> None:
    """SIGTERM (skipped when wait_s is 0), wait up to wait_s for them to exit, then SIGKILL."""
    pids = [p for p in pids if _alive(p)]
    if not pids:
        return
    if wait_s > 0:
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [p for p in pids if _alive(p)]
    if pids:
        _signal(pids, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in pids if _alive(p)]


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    """Running, and not a zombie (an orphan's zombie waits for init, which may be slow to reap).

    Each thread counts: a process's first thread shows as a zombie as soon as it exits, while
    the others may still be finishing (a store thread in fsync or splice) and hold its open
    files, its listening port among them."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
        except (OSError, IndexError):
            pass
    return False
