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

from appliance.config import Config
from appliance.inventory import Inventory
from appliance.plan.gpu_units import (auto_gpu_cpus, gpu_enabled, gpu_units, previous_gpu_cpus, GpuUnit,
                                      whole_gpu_shapes)
from appliance.plan.model import MiB, PAGE, Plan, PlanError, Slot, round_down, slot_number
from appliance.units import format_size

GiB = 1024**3


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


def _sizes(kind_cfg, key: str, cpus: int, per_cpu: int) -> tuple[int, int]:
    # Auto sizes are whole MiB, named ones whole pages: the kernel rounds limits and tmpfs
    # sizes to pages, and what it reports should equal the plan.
    memory = round_down(per_cpu * cpus, MiB) if kind_cfg.memory == "auto" else round_down(kind_cfg.memory, PAGE)
    shm = round_down(memory // 4, MiB) if kind_cfg.shm == "auto" else round_down(kind_cfg.shm, PAGE)
    if memory < 64 * MiB:
        raise PlanError(f"slots.{key}.memory would be {format_size(memory)}, too little to run a job; "
                        "give the host more memory, lower host.reserved_memory, or make fewer slots")
    if shm > memory:
        raise PlanError(f"slots.{key}.shm = {format_size(shm)} is larger than the slot's memory "
                        f"{format_size(memory)} (/dev/shm pages count against it); lower slots.{key}.shm")
    return memory, shm


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
        elif not gpu_enabled(gpu, disabled):
            notes.append(f"GPU {gpu.index} ({gpu.uuid}) left out: disabled in config (gpus.disabled)")
        else:
            good.append(gpu)
    shapes, gone = whole_gpu_shapes(config, listed, good, previous, notes)
    units = sorted(gpu_units(config, inventory, good, shapes, previous, notes), key=GpuUnit.key)

    # CPUs per GPU slot. "auto" sizes by every GPU NVML lists, healthy or not, so a GPU turning
    # bad does not reshape (and restart) the other GPU slots; once chosen, it sticks while it
    # still fits, for the same reason.
    named = config.slots.gpu.cpus
    gpu_cpus = 0
    if units and named == "auto":
        gpu_cpus = auto_gpu_cpus(len(free), len(listed))
        earlier = previous_gpu_cpus(previous)
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

    def make_slot(name, kind, cpus, unit: GpuUnit | None = None):
        if unit is None:
            return Slot(name=name, kind=kind, cpus=tuple(sorted(cpus)), mems=inventory.numa_nodes(cpus),
                        memory_bytes=cpu_memory, shm_bytes=cpu_shm)
        memory, shm = sizes[unit.cpus]
        return Slot(name=name, kind=kind, cpus=tuple(sorted(cpus)), mems=inventory.numa_nodes(cpus),
                    memory_bytes=memory, shm_bytes=shm, gpus=unit.visible,
                    gpu_indexes=tuple(g.index for g in unit.gpus), gpu_memory_bytes=unit.gpu_memory,
                    gpu_share=unit.share)

    prev_slots = sorted(previous.slots if previous else (), key=lambda s: slot_number(s.name))
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

    slots = tuple(sorted(kept + created, key=lambda s: slot_number(s.name)))
    return Plan(slots=slots, reserved_cpus=reserved, reserved_memory=reserved_memory, notes=tuple(notes),
                gpu_cpus=gpu_cpus, gpus_gone=gone)
