"""What a slot may run: pure policy over a request's resources and the slots' shapes.

`fit` says where a parsed request can run, from the shape of this slot, the shapes of the
other slots of the plan and the work disk: here now, here later (the disk may free up),
on another slot (give it back), or on no slot of this appliance (refuse it on a shared queue,
dead-letter it on a local one). `expired` says when a request's lifetime ran out before it
could start. Both are pure (tests/test_triage.py is their table); the runner (runner.py) acts
on their verdicts. The shapes come from the applied plan (`plan.json`), else the slot's
environment, else the host.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from appliance.studioml.request import Request, unmet

UNKNOWN_GPU_MEMORY = 1 << 62  # the plan does not record GPU memory: do not check it

RUN = "run"  # this slot can run it now
LATER = "later"  # this slot can run it, but not now (its disk is full): give it back
ELSEWHERE = "elsewhere"  # another slot of this appliance can run it: give it back
NOWHERE = "nowhere"  # no slot of this appliance could ever run it


@dataclass
class SlotShape:
    name: str
    cpus: int
    memory_bytes: int
    gpus: int
    gpu_mem_bytes: int = UNKNOWN_GPU_MEMORY


def env_cpus(text: str) -> int:
    """How many CPUs APPLIANCE_SLOT_CPUS (a Linux CPU list like "2-3,6") names."""
    from appliance.slot.limits import parse_cpu_list
    try:
        return max(1, len(parse_cpu_list(text)))
    except Exception:
        return len(os.sched_getaffinity(0))


_shapes: dict = {}  # plan.json path -> ((mtime_ns, size, inode), its slots): read again when it changes


def slot_shapes(home) -> list[SlotShape]:
    """Every slot of the applied plan (`plan.json`); [] when there is none."""
    path = str(home.plan_file)
    try:
        st = os.stat(path)
    except OSError:
        return []
    seen = _shapes.get(path)
    if seen is not None and seen[0] == (st.st_mtime_ns, st.st_size, st.st_ino):
        return list(seen[1])
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    out = []
    for s in data.get("slots", []):
        try:
            out.append(SlotShape(name=s["name"], cpus=len(s.get("cpus", [])),
                                 memory_bytes=int(s.get("memory_bytes", 0)),
                                 gpus=len(s.get("gpus", [])),
                                 # per GPU, what this slot may use (a share, a MIG device's); an
                                 # older plan.json does not say
                                 gpu_mem_bytes=int(s.get("gpu_memory_bytes") or 0) or UNKNOWN_GPU_MEMORY))
        except (KeyError, TypeError, ValueError):
            continue
    _shapes[path] = ((st.st_mtime_ns, st.st_size, st.st_ino), out)
    return list(out)


def this_slot(home, slot: str, environ=os.environ) -> SlotShape:
    """This runner's shape: from the plan, else the slot environment, else the host."""
    for s in slot_shapes(home):
        if s.name == slot:
            return s
    cpus = env_cpus(environ["APPLIANCE_SLOT_CPUS"]) if environ.get("APPLIANCE_SLOT_CPUS") \
        else len(os.sched_getaffinity(0))
    mem = environ.get("APPLIANCE_SLOT_MEMORY_BYTES")
    if mem and mem.isdigit():
        memory = int(mem)
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cuda = environ.get("CUDA_VISIBLE_DEVICES", "")
    gpus = len([g for g in cuda.split(",") if g.strip() and g.strip() != "-1"])
    gpu_mem = environ.get("APPLIANCE_GPU_MEMORY_BYTES", "")
    return SlotShape(name=slot, cpus=cpus, memory_bytes=memory, gpus=gpus,
                     gpu_mem_bytes=int(gpu_mem) if gpu_mem.isdigit() and int(gpu_mem) else UNKNOWN_GPU_MEMORY)



def unmet_on(req: Request, s: SlotShape, disk: int) -> Optional[str]:
    """What slot `s` (with `disk` bytes of work disk) lacks to run `req`; None if nothing."""
    return unmet(req.resources, cpus=s.cpus, memory_bytes=s.memory_bytes, gpus=s.gpus,
                 gpu_mem_bytes=s.gpu_mem_bytes, disk_bytes=disk)


def fit(req: Request, me: SlotShape, others: list, disk_total: int, disk_free: int) -> tuple:
    """(verdict, why): RUN, LATER, ELSEWHERE, or NOWHERE with what this slot lacks."""
    here = unmet_on(req, me, disk_total)
    if here is None:
        return (RUN, None) if unmet_on(req, me, disk_free) is None else (LATER, None)
    if any(unmet_on(req, s, disk_total) is None for s in others):
        return ELSEWHERE, None
    return NOWHERE, here


def expired(req: Request, default_lifetime_s: float, now: float) -> Optional[str]:
    """Why `req` may no longer start (its lifetime since time_added passed); None if it may."""
    lifetime = req.lifetime_s or default_lifetime_s
    if req.time_added and req.lifetime_s and req.time_added + lifetime < now:
        return f"expired: experimentLifetime of {lifetime:.0f}s since time_added passed before it could start"
    return None
