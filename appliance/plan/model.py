"""What a plan is: its slots, its JSON form (`run/plan.json`), and the difference of two plans."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields

from appliance.inventory import format_cpu_list
from appliance.units import format_size

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


def round_down(n: int, unit: int) -> int:
    return n - n % unit


def slot_number(name: str) -> int:
    m = re.fullmatch(r"slot-(\d+)", name)
    return int(m.group(1)) if m else 1 << 30
