"""The planner: a pure function from (config, inventory, previous plan) to a plan of slots.

Rules, in order:
1. Keep CPUs and memory back for the OS and the appliance (`host.reserved_*`).
2. GPU slots from the healthy, enabled GPUs, with CPUs close to their GPUs where NVML knows:
   - whole GPUs make slots of `slots.gpu.gpus_per_slot` GPUs (a number that divides the GPUs
     NVML lists, or a list of sizes adding up to them), grouped nearest first: NVLink peers,
     then one PCIe switch, ..., then one NUMA node, then across sockets (gpus.py's distance);
     largest slots are formed first, each from the free GPUs closest together;
   - `slots.gpu.share = N` makes N slots of each GPU, each with 1/N of its memory;
   - a GPU in MIG mode makes one slot per MIG device (CUDA_VISIBLE_DEVICES=MIG-...), whatever
     gpus_per_slot says (CUDA uses one MIG device per process); MIG GPUs are not counted by it.
   Every GPU slot records the GPU memory it may use on each of its GPUs (`gpu_memory_bytes`).
   CPUs: `slots.gpu.cpus` per slot, or "auto": up to 4 per whole GPU (leaving half the CPUs to
   CPU slots), k times that for k GPUs, 1/N of it for a share, the MIG device's fraction of its
   GPU's memory for a MIG slot; at least 1.
3. Every CPU left becomes a CPU slot of `slots.cpu.cpus` CPUs (or `slots.cpu.count` of them).
4. Memory is shared out per CPU: a slot gets (memory left / CPUs left) per CPU it has, unless
   the config names a size. /dev/shm is a quarter of the slot's memory unless named.
   Never oversubscribed: CPUs are never shared, memory limits never add up past what is left.
5. Stable: a slot of the previous plan whose CPUs and GPUs still exist, and whose shape has not
   changed, is kept as it was (same name, same CPUs), so a re-plan restarts as little as possible.
   A slot of several GPUs is one unit: when one of its GPUs is lost, unhealthy or disabled, that
   slot goes (drains) and no other slot changes. Its remaining GPUs are free: they form a new
   slot of a size the config still misses with other free GPUs (nearest first), else they stay
   idle with a note until the lost GPU is back (then the slot is formed again, under a new name).
   A GPU that leaves NVML's list altogether is treated the same (counted as lost, so
   gpus_per_slot still divides the GPUs) until the GPUs NVML lists fit the shape by themselves.
   A MIG device keeps its slot while its UUID exists; a shared GPU keeps its N slots.

Nothing here touches the system; `inventory` says what the host has.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields

from appliance.config import Config
from appliance.gpus import UNKNOWN, Gpu
from appliance.inventory import Inventory, format_cpu_list
from appliance.units import format_size

GiB = 1024**3
MiB = 1024**2
PAGE = 4096
MAX_GROUPINGS = 20000  # beyond this many candidate groups, grow groups greedily instead


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
    gpus: tuple[str, ...] = ()  # for CUDA_VISIBLE_DEVICES: GPU UUIDs, or one MIG-... UUID
    gpu_indexes: tuple[int, ...] = ()  # NVML indexes of the physical GPUs
    gpu_memory_bytes: int = 0  # GPU memory this slot may use on each of its GPUs
    gpu_share: int = 1  # how many slots share its GPU (slots.gpu.share)

    def shape(self) -> tuple:
        return (self.kind, len(self.cpus), self.memory_bytes, self.shm_bytes, len(self.gpus),
                self.gpu_memory_bytes, self.gpu_share)

    @property
    def mig(self) -> bool:
        return bool(self.gpus) and self.gpus[0].startswith("MIG-")


@dataclass(frozen=True)
class Plan:
    slots: tuple[Slot, ...]
    reserved_cpus: tuple[int, ...] = ()
    reserved_memory: int = 0
    notes: tuple[str, ...] = field(default=())  # GPUs left out and why, and similar
    gpu_cpus: int = 0  # CPUs per whole GPU "auto" chose (0: named in the config, or no GPU)
    gpus_gone: tuple[str, ...] = ()  # GPUs no longer listed by NVML that gpus_per_slot still counts

    def slot(self, name: str) -> Slot | None:
        return next((s for s in self.slots if s.name == name), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Also reads plan.json files of earlier versions (fields missing: their defaults)."""
        data = json.loads(text)
        known = {f.name for f in fields(Slot)}
        slots = tuple(Slot(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items() if k in known})
                      for s in data["slots"])
        return cls(slots=slots, reserved_cpus=tuple(data.get("reserved_cpus", ())),
                   reserved_memory=data.get("reserved_memory", 0), notes=tuple(data.get("notes", ())),
                   gpu_cpus=int(data.get("gpu_cpus", 0)), gpus_gone=tuple(data.get("gpus_gone", ())))


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


def _auto_gpu_cpus(free: int, gpus: int) -> int:
    """"auto" CPUs per whole GPU: up to 4, leaving half the CPUs to CPU slots."""
    return max(1, min(4, free // (2 * gpus)))


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


def _describe(gpu: Gpu) -> str:
    return f"GPU {gpu.index} ({gpu.uuid})"


def _shape_text(shapes) -> str:
    return f"[{', '.join(map(str, shapes))}]" if isinstance(shapes, tuple) else str(shapes)


def _whole_gpu_shapes(config: Config, listed: list[Gpu], good: list[Gpu], previous: Plan | None,
                      notes: list[str]) -> tuple[list[int], tuple[str, ...]]:
    """Slot sizes for the whole GPUs (not in MIG mode), checked against the GPUs NVML lists,
    healthy or not, so a GPU turning bad does not make the config wrong; and the GPUs that have
    left NVML's list since the shapes last fitted, still counted (as lost) so they do not either.
    """
    wanted, share = config.slots.gpu.gpus_per_slot, config.slots.gpu.share
    several = isinstance(wanted, tuple) or wanted > 1
    if share > 1 and several:
        raise PlanError(f"slots.gpu.gpus_per_slot = {_shape_text(wanted)} and slots.gpu.share = {share} are both "
                        "set: a slot either spans several whole GPUs or takes a share of one; set one of them to 1")
    mig = [g for g in good if g.mig_enabled]
    if share > 1 and mig:
        raise PlanError(f"slots.gpu.share = {share}, but {', '.join(map(_describe, mig))} "
                        f"{'is' if len(mig) == 1 else 'are'} in MIG mode (its MIG devices are already slices, "
                        "one slot each): set slots.gpu.share = 1, or turn MIG off (nvidia-smi -i INDEX -mig 0)")
    whole = {g.uuid for g in listed if not g.mig_enabled}
    n = len(whole)
    fits = (lambda k: sum(wanted) == k) if isinstance(wanted, tuple) else (lambda k: k % wanted == 0)
    if n == 0:
        return [], ()
    gone: tuple[str, ...] = ()
    if not fits(n) and previous is not None:
        remembered = {u for s in previous.slots if s.kind == "gpu" and not s.mig for u in s.gpus}
        remembered |= set(previous.gpus_gone)
        gone = tuple(sorted(remembered - whole - {g.uuid for g in listed}))
        if gone and fits(n + len(gone)):
            n += len(gone)
            notes += [f"{u} left NVML's list: counted as lost, so slots.gpu.gpus_per_slot still fits" for u in gone]
        else:
            gone = ()
    if isinstance(wanted, tuple):
        if sum(wanted) != n:
            raise PlanError(f"slots.gpu.gpus_per_slot = {_shape_text(wanted)} adds up to {sum(wanted)} GPUs, but "
                            f"this host has {n} (not counting GPUs in MIG mode); list slot sizes that add up "
                            f"to {n}, like {_shape_text(_example_shapes(wanted, n))}, or give one number that "
                            f"divides {n}")
        return sorted(wanted, reverse=True), gone
    if n % wanted:
        divisors = [d for d in (1, 2, 4, 8, 3, 6) if n % d == 0 and d <= n]
        raise PlanError(f"slots.gpu.gpus_per_slot = {wanted} cannot split this host's {n} GPUs (not counting "
                        f"GPUs in MIG mode) into slots of {wanted}: use {' or '.join(map(str, sorted(divisors)))}, "
                        f"or a list of slot sizes adding up to {n}, like {_shape_text(_example_shapes(wanted, n))}")
    return [wanted] * (n // wanted), gone


def _example_shapes(wanted, n: int) -> tuple:
    """Sizes close to what the config asks that do add up to n GPUs."""
    out, left = [], n
    for size in sorted(wanted if isinstance(wanted, tuple) else (wanted,) * n, reverse=True):
        if size <= left:
            out.append(size)
            left -= size
    return tuple(out) + (left,) * bool(left)


def _group_cost(group, dist) -> tuple:
    pairs = [dist(a, b) for a, b in itertools.combinations(group, 2)]
    return (max(pairs, default=0), sum(pairs), tuple(g.index for g in group))


def _best_group(free: list[Gpu], size: int, dist) -> tuple[Gpu, ...]:
    """The `size` free GPUs closest together: fewest far links, then lowest indexes."""
    if math.comb(len(free), size) <= MAX_GROUPINGS:
        return min(itertools.combinations(free, size), key=lambda g: _group_cost(g, dist))
    group = [free[0]]  # too many to try: grow from the lowest index, nearest GPU next
    while len(group) < size:
        rest = [g for g in free if g not in group]
        group.append(min(rest, key=lambda g: (max(dist(g, m) for m in group), sum(dist(g, m) for m in group),
                                               g.index)))
    return tuple(sorted(group, key=lambda g: g.index))


@dataclass
class _Unit:
    """One GPU slot to be: its physical GPUs, what CUDA sees, and how many CPUs it wants."""
    gpus: tuple[Gpu, ...]
    visible: tuple[str, ...]
    gpu_memory: int
    share: int = 1
    cpus: int = 0
    mig_fraction: float = 0.0  # a MIG device's part of its GPU's memory

    def key(self) -> tuple:
        return (min(g.index for g in self.gpus), self.visible)


def _gpu_units(config: Config, inventory: Inventory, good: list[Gpu], shapes: list[int],
               previous: Plan | None, notes: list[str]) -> list[_Unit]:
    share = config.slots.gpu.share
    units: list[_Unit] = []
    whole = [g for g in good if not g.mig_enabled]
    for gpu in good:
        if gpu.mig_enabled:
            if not gpu.mig_devices:
                notes.append(f"{_describe(gpu)} left out: it is in MIG mode with no MIG device; create MIG "
                             f"devices (nvidia-smi mig -i {gpu.index} -cgi PROFILES -C) or turn MIG off")
            for mig in gpu.mig_devices:
                units.append(_Unit((gpu,), (mig.uuid,), mig.memory_bytes,
                                   mig_fraction=mig.memory_bytes / gpu.memory_bytes if gpu.memory_bytes else 0.0))
        elif share > 1:
            units += [_Unit((gpu,), (gpu.uuid,), _round_down(gpu.memory_bytes // share, MiB), share)
                      for _ in range(share)]
    if share > 1:
        return units

    # whole GPUs: groups of the previous plan whose GPUs are all still good stay together
    by_uuid = {g.uuid: g for g in whole}
    left_shapes = list(shapes)
    used: set[str] = set()
    groups: list[tuple[Gpu, ...]] = []
    for old in sorted(previous.slots if previous else (), key=lambda s: _slot_number(s.name)):
        if (old.kind == "gpu" and old.gpu_share == 1 and old.gpus and all(u in by_uuid for u in old.gpus)
                and not used & set(old.gpus) and len(old.gpus) in left_shapes):
            left_shapes.remove(len(old.gpus))
            used |= set(old.gpus)
            groups.append(tuple(by_uuid[u] for u in old.gpus))
    # the sizes still missing, largest first, each from the free GPUs closest together
    links = {frozenset((link.a, link.b)): link.distance for link in inventory.gpu_links}
    dist = lambda a, b: links.get(frozenset((a.uuid, b.uuid)), UNKNOWN)  # noqa: E731
    free = [g for g in whole if g.uuid not in used]
    for size in left_shapes:
        if size <= len(free):
            group = _best_group(free, size, dist)
            groups.append(group)
            free = [g for g in free if g not in group]
    for gpu in free:
        notes.append(f"{_describe(gpu)} left out: slots take {_shape_text(config.slots.gpu.gpus_per_slot)} GPUs "
                     "(slots.gpu.gpus_per_slot) and too few other GPUs are healthy and free to make one with it")
    for group in groups:
        units.append(_Unit(group, tuple(g.uuid for g in group), min(g.memory_bytes for g in group)))
    return units


def _previous_gpu_cpus(previous: Plan | None) -> int:
    """The "auto" CPUs per whole GPU the previous plan chose, 0 if it does not say."""
    if previous is None:
        return 0
    if previous.gpu_cpus:
        return previous.gpu_cpus
    earlier = {len(s.cpus) // len(s.gpus) for s in previous.slots
               if s.kind == "gpu" and s.gpus and s.gpu_share == 1 and not s.mig}
    return earlier.pop() if len(earlier) == 1 else 0


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
    listed = sorted(inventory.gpus, key=lambda g: g.index)
    good = []
    for gpu in listed:
        if not gpu.healthy:
            notes.append(f"GPU {gpu.index} ({gpu.uuid}) left out: {gpu.problem or 'unhealthy'}")
        elif not _gpu_enabled(gpu, disabled):
            notes.append(f"GPU {gpu.index} ({gpu.uuid}) left out: disabled in config (gpus.disabled)")
        else:
            good.append(gpu)
    shapes, gone = _whole_gpu_shapes(config, listed, good, previous, notes)
    units = sorted(_gpu_units(config, inventory, good, shapes, previous, notes), key=_Unit.key)

    # CPUs per GPU slot. "auto" sizes by every GPU NVML lists, healthy or not, so a GPU turning
    # bad does not reshape (and restart) the other GPU slots; once chosen, it sticks while it
    # still fits, for the same reason.
    named = config.slots.gpu.cpus
    gpu_cpus = 0
    if units and named == "auto":
        gpu_cpus = _auto_gpu_cpus(len(free), len(listed))
        earlier = _previous_gpu_cpus(previous)
        if earlier and (earlier * len(good) <= len(free) // 2 or earlier == gpu_cpus):
            gpu_cpus = earlier
    for u in units:
        if named != "auto":
            u.cpus = named
        elif u.mig_fraction:
            u.cpus = max(1, int(gpu_cpus * u.mig_fraction))
        else:
            u.cpus = max(1, gpu_cpus * len(u.gpus) // u.share)
    gpu_total = sum(u.cpus for u in units)
    if gpu_total > len(free) and named != "auto":
        raise PlanError(f"slots.gpu.cpus = {named} for {len(units)} GPU slots needs {gpu_total} CPUs, but only "
                        f"{len(free)} are left after host.reserved_cpus; lower slots.gpu.cpus or "
                        "host.reserved_cpus, or fence GPUs with `appliance gpu disable`")
    while gpu_total > len(free):  # auto, and fewer CPUs than GPU slots
        u = units.pop()
        gpu_total -= u.cpus
        notes.append(f"GPU {','.join(str(g.index) for g in u.gpus)} ({', '.join(u.visible)}) left out: "
                     "no CPU left for its slot")
    sizes = {u.cpus: _sizes(config.slots.gpu, "gpu", u.cpus, per_cpu) for u in units}

    cpu_each = config.slots.cpu.cpus
    left_for_cpu_slots = len(free) - gpu_total
    if config.slots.cpu.count == "auto":
        cpu_count = left_for_cpu_slots // cpu_each
    else:
        cpu_count = config.slots.cpu.count
        if cpu_count * cpu_each > left_for_cpu_slots:
            raise PlanError(f"slots.cpu.count = {cpu_count} of {cpu_each} CPU(s) needs "
                            f"{cpu_count * cpu_each} CPUs, but {left_for_cpu_slots} are left after "
                            f"host.reserved_cpus ({n_reserved}) and GPU slots ({gpu_total}); "
                            "lower slots.cpu.count or leave it \"auto\"")
    cpu_memory, cpu_shm = _sizes(config.slots.cpu, "cpu", cpu_each, per_cpu) if cpu_count else (0, 0)

    total_memory = sum(sizes[u.cpus][0] for u in units) + cpu_memory * cpu_count
    if total_memory > pool:
        raise PlanError(f"slots ask for {format_size(total_memory)} of memory in all, but only "
                        f"{format_size(pool)} is left after host.reserved_memory; lower "
                        "slots.cpu.memory / slots.gpu.memory or set them to \"auto\"")
    if not units and not cpu_count:
        raise PlanError("this plan has no slot: raise slots.cpu.count or lower host.reserved_cpus")

    def make_slot(name, kind, cpus, unit: _Unit | None = None):
        if unit is None:
            return Slot(name=name, kind=kind, cpus=tuple(sorted(cpus)), mems=inventory.numa_nodes(cpus),
                        memory_bytes=cpu_memory, shm_bytes=cpu_shm)
        memory, shm = sizes[unit.cpus]
        return Slot(name=name, kind=kind, cpus=tuple(sorted(cpus)), mems=inventory.numa_nodes(cpus),
                    memory_bytes=memory, shm_bytes=shm, gpus=unit.visible,
                    gpu_indexes=tuple(g.index for g in unit.gpus), gpu_memory_bytes=unit.gpu_memory,
                    gpu_share=unit.share)

    prev_slots = sorted(previous.slots if previous else (), key=lambda s: _slot_number(s.name))
    available = set(free)
    kept: list[Slot] = []

    # 1. previous GPU slots whose GPUs (or MIG device, or share of a GPU) are still wanted,
    #    CPUs still free and shape unchanged
    wanted = list(units)
    for old in prev_slots:
        if old.kind != "gpu":
            continue
        unit = next((u for u in wanted if u.visible == old.gpus and u.share == old.gpu_share), None)
        if unit is None:
            continue
        candidate = make_slot(old.name, "gpu", old.cpus, unit)
        if set(old.cpus) <= available and candidate.shape() == old.shape():
            kept.append(candidate)
            available -= set(old.cpus)
            wanted.remove(unit)

    # 2. new GPU slots: CPUs near most of the slot's GPUs first, then ones no previous CPU slot holds
    held_by_cpu_slots = {c for s in prev_slots if s.kind == "cpu" for c in s.cpus}
    new_gpu_slots = []
    for unit in wanted:
        near = [set(g.cpus or ()) for g in unit.gpus]
        ranked = sorted(available, key=lambda c: (-sum(c in n for n in near), c in held_by_cpu_slots, c))
        chosen = ranked[:unit.cpus]
        available -= set(chosen)
        new_gpu_slots.append((unit, chosen))

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
    created = [make_slot(next(numbers), "gpu", cpus, unit) for unit, cpus in new_gpu_slots]
    pool_cpus = sorted(available)
    for i in range(cpu_count - cpu_slots_kept):
        created.append(make_slot(next(numbers), "cpu", pool_cpus[i * cpu_each:(i + 1) * cpu_each]))

    slots = tuple(sorted(kept + created, key=lambda s: _slot_number(s.name)))
    return Plan(slots=slots, reserved_cpus=reserved, reserved_memory=reserved_memory, notes=tuple(notes),
                gpu_cpus=gpu_cpus, gpus_gone=gone)


def describe_slot(slot: Slot) -> str:
    gpu = ""
    if slot.gpus:
        gpu = f" gpu {','.join(map(str, slot.gpu_indexes))}"
        if slot.mig:
            gpu += f" MIG {slot.gpus[0]}"
        if slot.gpu_share > 1:
            gpu += f" (1/{slot.gpu_share})"
        gpu += f" gpu memory {format_size(slot.gpu_memory_bytes)}"
    return (f"{slot.name}: cpus {format_cpu_list(slot.cpus)} memory {format_size(slot.memory_bytes)} "
            f"shm {format_size(slot.shm_bytes)}{gpu}")
