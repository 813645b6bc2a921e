"""Real cgroups for tests: a unique APPLIANCE_CGROUP_PARENT per test, removed afterwards."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from appliance.slot import cgroup
from appliance.slot.cgroup import CgroupError, Hierarchy, SlotCgroup
from tests.realparts import need


def real_hierarchy() -> Hierarchy | None:
    try:
        return Hierarchy.detect()
    except (CgroupError, OSError):
        return None


def wait_empty(cg: SlotCgroup, tries: int = 200) -> None:
    for _ in range(tries):
        if not cg.pids():
            return
        time.sleep(0.01)


def remove_cgroup_parent(parent: str, hierarchy: Hierarchy | None = None) -> None:
    """Kill whatever is left in the slots below `parent` and remove them and it."""
    hierarchy = hierarchy or real_hierarchy()
    if hierarchy is None:
        return
    for root in hierarchy.roots():
        base = os.path.join(root, parent)
        if not os.path.isdir(base):
            continue
        for slot in os.listdir(base):
            if not os.path.isdir(os.path.join(base, slot)):
                continue
            cg = SlotCgroup(slot, hierarchy, parent)
            for pid in cg.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_empty(cg)
            cg.remove()
        os.rmdir(base)
    if hierarchy.cpuacct and hierarchy.cpuacct not in hierarchy.roots():  # v1 CPU accounting (its slots went above)
        try:
            os.rmdir(os.path.join(hierarchy.cpuacct, parent))
        except OSError:
            pass


@pytest.fixture
def cgroup_parent(monkeypatch):
    """A unique APPLIANCE_CGROUP_PARENT on the real cgroupfs; everything below it is removed after."""
    hierarchy = real_hierarchy()
    need(os.geteuid() == 0, "root (to create cgroups)")
    need(hierarchy is not None, "a cgroupfs with the cpuset and memory controllers")
    parent = f"appliance-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(cgroup.PARENT_ENV, parent)
    yield parent
    remove_cgroup_parent(parent, hierarchy)


@pytest.fixture
def slot_cgroup(cgroup_parent):
    """A real slot "slot-oom" on one CPU with a 64 MiB memory limit, below a unique parent."""
    cpus = sorted(os.sched_getaffinity(0))[:1]
    cgroup.setup_slot("slot-oom", cpus, [0], 64 * 1024 * 1024)
    return "slot-oom"
