"""The planner: a pure function from (config, inventory, previous plan) to a plan of slots.

Rules, in order:
1. Keep CPUs and memory back for the OS and the appliance (`host.reserved_*`).
2. One GPU slot per healthy, enabled GPU, with CPUs close to that GPU where NVML knows.
3. Every CPU left becomes a CPU slot of `slots.cpu.cpus` CPUs (or `slots.cpu.count` of them).
4. Memory is shared out per CPU: a slot gets (memory left / CPUs left) per CPU it has, unless
   the config names a size. /dev/shm is a quarter of the slot's memory unless named.
   Never oversubscribed: CPUs are never shared, memory limits never add up past what is left.
5. Stable: a slot of the previous plan whose CPUs and GPU still exist, and whose shape has not
   changed, is kept as it was (same name, same CPUs), so a re-plan restarts as little as possible.

Nothing here touches the system; `inventory` says what the host has.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from appliance.config import Config
from appliance.inventory import Inventory, format_cpu_list
from appliance.units import format_size

GiB = 1024**3
MiB = 1024**2
PAGE = 4096


class PlanError(ValueError):
    """The config asks for more than the host has; the message names the key and the fix."""


@dataclass(frozen=True)
class Slot:
    name: str
    kind: str  # "cpu" or "gpu"
    cpus: tuple[int, ...]
    mems: tuple[int, ...]  # NUMA nodes of those CPUs (cpuset.mems)
    memory_bytes: int
    shm_bytes: int
    gpus: tuple[str, ...] = ()  # GPU UUIDs
    gpu_indexes: tuple[int, ...] = ()

    def shape(self) -> tuple:
        return (self.kind, len(self.cpus), self.memory_bytes, self.shm_bytes)


@dataclass(frozen=True)
class Plan:
    slots: tuple[Slot, ...]
    reserved_cpus: tuple[int, ...] = ()
    reserved_memory: int = 0
    notes: tuple[str, ...] = field(default=())  # GPUs left out and why, and similar

    def slot(self, name: str) -> Slot | None:
        return next((s for s in self.slots if s.name == name), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        slots = tuple(Slot(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                      for s in data["slots"])
        return cls(slots=slots, reserved_cpus=tuple(data.get("reserved_cpus", ())),
                   reserved_memory=data.get("reserved_memory", 0), notes=tuple(data.get("notes", ())))


@dataclass(frozen=True)
class PlanDiff:
    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def diff_plans(old: Plan | None, new: Plan) -> PlanDiff:
    before = {s.name: s for s in (old.slots if old else ())}
    after = {s.name: s for s in new.slots}
    return PlanDiff(
        added=tuple(n for n in after if n not in before),
        changed=tuple(n for n in after if n in before and before[n] != after[n]),
        removed=tuple(n for n in before if n not in after),
    )


def _reserved_cpu_count(config: Config, usable: int) -> int:
    wanted = config.host.reserved_cpus
    if wanted == "auto":
        return 0 if usable < 2 else max(1, usable // 32)
    if wanted >= usable:
        raise PlanError(f"host.reserved_cpus = {wanted} leaves no CPU for slots: this host lets the "
                        f"appliance use {usable} CPUs; set it below {usable}")
    return wanted


def _reserved_memory(config: Config, total: int) -> int:
    wanted = config.host.reserved_memory
    if wanted == "auto":
        return min(max(GiB, total // 10), total // 2)
    if wanted >= total:
        raise PlanError(f"host.reserved_memory = {format_size(wanted)} is all of this host's "
                        f"{format_size(total)}; set it lower")
    return wanted


def _gpu_enabled(gpu, disabled: tuple) -> bool:
    return str(gpu.index) not in disabled and gpu.uuid not in disabled


def _gpu_cpus_each(config: Config, free: int, gpus: int) -> int:
    wanted = config.slots.gpu.cpus
    if wanted == "auto":
        return max(1, min(4, free // (2 * gpus)))
    if wanted * gpus > free:
        raise PlanError(f"slots.gpu.cpus = {wanted} for {gpus} GPUs needs {wanted * gpus} CPUs, but "
                        f"only {free} are left after host.reserved_cpus; lower slots.gpu.cpus or "
                        "host.reserved_cpus, or fence GPUs with `appliance gpu disable`")
    return wanted


def _sizes(kind_cfg, key: str, cpus: int, per_cpu: int) -> tuple[int, int]:
    # Auto sizes are whole MiB, named ones whole pages: the kernel rounds limits and tmpfs
    # sizes to pages, and what it reports should equal the plan.
    memory = _round_down(per_cpu * cpus, MiB) if kind_cfg.memory == "auto" else _round_down(kind_cfg.memory, PAGE)
    shm = _round_down(memory // 4, MiB) if kind_cfg.shm == "auto" else _round_down(kind_cfg.shm, PAGE)
    if memory < 64 * MiB:
        raise PlanError(f"slots.{key}.memory would be {format_size(memory)}, too little to run a job; "
                        "give the host more memory, lower host.reserved_memory, or make fewer slots")
    if shm > memory:
        raise PlanError(f"slots.{key}.shm = {format_size(shm)} is larger than the slot's memory "
                        f"{format_size(memory)} (/dev/shm pages count against it); lower slots.{key}.shm")
    return memory, shm


def _round_down(n: int, unit: int) -> int:
    return n - n % unit


def _slot_number(name: str) -> int:
    m = re.fullmatch(r"slot-(\d+)", name)
    return int(m.group(1)) if m else 1 << 30


def make_plan(config: Config, inventory: Inventory, previous: Plan | None = None) -> Plan:
    usable = sorted(inventory.cpus)
    if not usable:
        raise PlanError("this process may use no CPU at all (affinity or cgroup cpuset is empty)")
    n_reserved = _reserved_cpu_count(config, len(usable))
    reserved = tuple(usable[:n_reserved])
    free = [c for c in usable if c not in reserved]

    reserved_memory = _reserved_memory(config, inventory.memory_bytes)
    pool = inventory.memory_bytes - reserved_memory
    per_cpu = pool // len(free)

    notes = []
    disabled = tuple(str(d) for d in config.gpus.disabled)
    gpus = []
    for gpu in sorted(inventory.gpus, key=lambda g: g.index):
        if not gpu.healthy:
            notes.append(f"GPU {gpu.index} ({gpu.uuid}) left out: {gpu.problem or 'unhealthy'}")
        elif not _gpu_enabled(gpu, disabled):
            notes.append(f"GPU {gpu.index} ({gpu.uuid}) left out: disabled in config (gpus.disabled)")
        else:
            gpus.append(gpu)
    # "auto" sizes GPU slots by every GPU NVML lists, healthy or not, so a GPU turning bad
    # does not reshape (and restart) the other GPU slots.
    # Once chosen, an "auto" size sticks while it still fits, for the same reason.
    gpu_each = _gpu_cpus_each(config, len(free), len(inventory.gpus)) if gpus else 0
    earlier = {len(s.cpus) for s in (previous.slots if previous else ()) if s.kind == "gpu"}
    if gpus and config.slots.gpu.cpus == "auto" and len(earlier) == 1:
        k = earlier.pop()
        if k * len(gpus) <= len(free) // 2 or k == gpu_each:
            gpu_each = k
    if gpus and gpu_each * len(gpus) > len(free) and config.slots.gpu.cpus != "auto":
        raise PlanError(f"slots.gpu.cpus = {gpu_each} for {len(gpus)} GPUs needs {gpu_each * len(gpus)} "
                        f"CPUs, but only {len(free)} are left after host.reserved_cpus")
    if gpus and gpu_each * len(gpus) > len(free):  # auto, and fewer CPUs than GPUs
        for gpu in gpus[len(free):]:
            notes.append(f"GPU {gpu.index} ({gpu.uuid}) left out: no CPU left for its slot")
        gpus = gpus[: len(free)]
    gpu_memory, gpu_shm = _sizes(config.slots.gpu, "gpu", gpu_each, per_cpu) if gpus else (0, 0)

    cpu_each = config.slots.cpu.cpus
    left_for_cpu_slots = len(free) - gpu_each * len(gpus)
    if config.slots.cpu.count == "auto":
        cpu_count = left_for_cpu_slots // cpu_each
    else:
        cpu_count = config.slots.cpu.count
        if cpu_count * cpu_each > left_for_cpu_slots:
            raise PlanError(f"slots.cpu.count = {cpu_count} of {cpu_each} CPU(s) needs "
                            f"{cpu_count * cpu_each} CPUs, but {left_for_cpu_slots} are left after "
                            f"host.reserved_cpus ({n_reserved}) and GPU slots ({gpu_each * len(gpus)}); "
                            "lower slots.cpu.count or leave it \"auto\"")
    cpu_memory, cpu_shm = _sizes(config.slots.cpu, "cpu", cpu_each, per_cpu) if cpu_count else (0, 0)

    total_memory = gpu_memory * len(gpus) + cpu_memory * cpu_count
    if total_memory > pool:
        raise PlanError(f"slots ask for {format_size(total_memory)} of memory in all, but only "
                        f"{format_size(pool)} is left after host.reserved_memory; lower "
                        "slots.cpu.memory / slots.gpu.memory or set them to \"auto\"")
    if not gpus and not cpu_count:
        raise PlanError("this plan has no slot: raise slots.cpu.count or lower host.reserved_cpus")

    def make_slot(name, kind, cpus, gpu=None):
        memory, shm = (gpu_memory, gpu_shm) if kind == "gpu" else (cpu_memory, cpu_shm)
        return Slot(name=name, kind=kind, cpus=tuple(sorted(cpus)), mems=inventory.numa_nodes(cpus),
                    memory_bytes=memory, shm_bytes=shm,
                    gpus=(gpu.uuid,) if gpu else (), gpu_indexes=(gpu.index,) if gpu else ())

    prev_slots = sorted(previous.slots if previous else (), key=lambda s: _slot_number(s.name))
    available = set(free)
    kept: list[Slot] = []

    # 1. previous GPU slots whose GPU is still wanted, CPUs still free and shape unchanged
    wanted_gpus = {g.uuid: g for g in gpus}
    for old in prev_slots:
        if old.kind != "gpu" or len(old.gpus) != 1 or old.gpus[0] not in wanted_gpus:
            continue
        candidate = make_slot(old.name, "gpu", old.cpus, wanted_gpus[old.gpus[0]])
        if set(old.cpus) <= available and candidate.shape() == old.shape():
            kept.append(candidate)
            available -= set(old.cpus)
            del wanted_gpus[old.gpus[0]]

    # 2. new GPU slots: CPUs near the GPU first, then ones no previous CPU slot holds
    held_by_cpu_slots = {c for s in prev_slots if s.kind == "cpu" for c in s.cpus}
    new_gpu_slots = []
    for gpu in sorted(wanted_gpus.values(), key=lambda g: g.index):
        near = set(gpu.cpus or ())
        ranked = sorted(available, key=lambda c: (c not in near, c in held_by_cpu_slots, c))
        chosen = ranked[:gpu_each]
        available -= set(chosen)
        new_gpu_slots.append((gpu, chosen))

    # 3. previous CPU slots whose CPUs are still free and shape unchanged, up to the count
    cpu_slots_kept = 0
    for old in prev_slots:
        if old.kind != "cpu" or cpu_slots_kept >= cpu_count:
            continue
        candidate = make_slot(old.name, "cpu", old.cpus)
        if set(old.cpus) <= available and candidate.shape() == old.shape():
            kept.append(candidate)
            available -= set(old.cpus)
            cpu_slots_kept += 1

    # 4. new slots get the lowest names no slot of this or the previous plan has (so a diff
    #    never calls a different slot "changed"): GPU slots first, then CPU slots by CPU
    used_names = {s.name for s in kept} | {s.name for s in prev_slots}
    numbers = (f"slot-{i}" for i in range(1 << 20) if f"slot-{i}" not in used_names)
    created = [make_slot(next(numbers), "gpu", cpus, gpu) for gpu, cpus in new_gpu_slots]
    pool_cpus = sorted(available)
    for i in range(cpu_count - cpu_slots_kept):
        created.append(make_slot(next(numbers), "cpu", pool_cpus[i * cpu_each:(i + 1) * cpu_each]))

    slots = tuple(sorted(kept + created, key=lambda s: _slot_number(s.name)))
    return Plan(slots=slots, reserved_cpus=reserved, reserved_memory=reserved_memory, notes=tuple(notes))


def describe_slot(slot: Slot) -> str:
    gpu = f" gpu {','.join(map(str, slot.gpu_indexes))}" if slot.gpus else ""
    return (f"{slot.name}: cpus {format_cpu_list(slot.cpus)} memory {format_size(slot.memory_bytes)} "
            f"shm {format_size(slot.shm_bytes)}{gpu}")
