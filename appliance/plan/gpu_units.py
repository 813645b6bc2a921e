"""GPU slots: how the healthy, enabled GPUs are grouped into slot units.

Whole GPUs make slots of `slots.gpu.gpus_per_slot` GPUs, nearest first (NVLink peers, one PCIe
switch, ..., one NUMA node, across sockets: gpus.py's distance), largest slots first; a shared
GPU makes `slots.gpu.share` units of 1/N of its memory; a GPU in MIG mode one unit per MIG
device. Groups of the previous plan whose GPUs are all still good stay together.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from appliance.config import Config
from appliance.gpus import UNKNOWN, Gpu
from appliance.inventory import Inventory
from appliance.plan.model import MiB, Plan, PlanError, round_down, slot_number

MAX_GROUPINGS = 20000  # beyond this many candidate groups, grow groups greedily instead


def gpu_enabled(gpu, disabled: tuple) -> bool:
    return str(gpu.index) not in disabled and gpu.uuid not in disabled


def auto_gpu_cpus(free: int, gpus: int) -> int:
    """"auto" CPUs per whole GPU: up to 4, leaving half the CPUs to CPU slots."""
    return max(1, min(4, free // (2 * gpus)))


def _describe(gpu: Gpu) -> str:
    return f"GPU {gpu.index} ({gpu.uuid})"


def _shape_text(shapes) -> str:
    return f"[{', '.join(map(str, shapes))}]" if isinstance(shapes, tuple) else str(shapes)


def whole_gpu_shapes(config: Config, listed: list[Gpu], good: list[Gpu], previous: Plan | None,
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
class GpuUnit:
    """One GPU slot to be: its physical GPUs, what CUDA sees, and how many CPUs it wants."""
    gpus: tuple[Gpu, ...]
    visible: tuple[str, ...]
    gpu_memory: int
    share: int = 1
    cpus: int = 0
    mig_fraction: float = 0.0  # a MIG device's part of its GPU's memory

    def key(self) -> tuple:
        return (min(g.index for g in self.gpus), self.visible)


def gpu_units(config: Config, inventory: Inventory, good: list[Gpu], shapes: list[int],
               previous: Plan | None, notes: list[str]) -> list[GpuUnit]:
    share = config.slots.gpu.share
    units: list[GpuUnit] = []
    whole = [g for g in good if not g.mig_enabled]
    for gpu in good:
        if gpu.mig_enabled:
            if not gpu.mig_devices:
                notes.append(f"{_describe(gpu)} left out: it is in MIG mode with no MIG device; create MIG "
                             f"devices (nvidia-smi mig -i {gpu.index} -cgi PROFILES -C) or turn MIG off")
            for mig in gpu.mig_devices:
                units.append(GpuUnit((gpu,), (mig.uuid,), mig.memory_bytes,
                                   mig_fraction=mig.memory_bytes / gpu.memory_bytes if gpu.memory_bytes else 0.0))
        elif share > 1:
            units += [GpuUnit((gpu,), (gpu.uuid,), round_down(gpu.memory_bytes // share, MiB), share)
                      for _ in range(share)]
    if share > 1:
        return units

    # whole GPUs: groups of the previous plan whose GPUs are all still good stay together
    by_uuid = {g.uuid: g for g in whole}
    left_shapes = list(shapes)
    used: set[str] = set()
    groups: list[tuple[Gpu, ...]] = []
    for old in sorted(previous.slots if previous else (), key=lambda s: slot_number(s.name)):
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
        units.append(GpuUnit(group, tuple(g.uuid for g in group), min(g.memory_bytes for g in group)))
    return units


def previous_gpu_cpus(previous: Plan | None) -> int:
    """The "auto" CPUs per whole GPU the previous plan chose, 0 if it does not say."""
    if previous is None:
        return 0
    if previous.gpu_cpus:
        return previous.gpu_cpus
    earlier = {len(s.cpus) // len(s.gpus) for s in previous.slots
               if s.kind == "gpu" and s.gpus and s.gpu_share == 1 and not s.mig}
    return earlier.pop() if len(earlier) == 1 else 0
