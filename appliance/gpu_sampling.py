"""NVML at job time, for one runner: the processes on its slot's GPUs, their memory, how busy.

Like appliance/gpus.py this calls NVML only as `pynvml.X` (tests fake it at that boundary) and
hands out plain records. NVML is initialised once, when the watch is made (a runner makes one
for its life), not per look.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pynvml


@dataclass(frozen=True)
class Device:
    uuid: str
    ordinal: int  # its place in CUDA_VISIBLE_DEVICES (how CUDA and MPS number it for the workload)
    total_bytes: int


@dataclass(frozen=True)
class GpuProcess:
    gpu: str  # UUID
    pid: int
    memory_bytes: Optional[int]  # None: NVML cannot say (e.g. no permission, WDDM)


@dataclass(frozen=True)
class Sample:
    gpu: str
    pid: int
    time_us: int
    sm_pct: int
    mem_pct: int


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_devices(value: str) -> list[str]:
    """The entries of CUDA_VISIBLE_DEVICES ("" or "-1": none)."""
    out = [v.strip() for v in (value or "").split(",") if v.strip()]
    return [] if out in ([], ["-1"]) else out


class GpuWatch:
    """NVML for the GPUs one slot sees (UUIDs or indexes, as in CUDA_VISIBLE_DEVICES).

    No GPUs: inactive, no NVML call at all. NVML missing or failing on a GPU: inactive with
    `problem` saying why (the runner shows it in `status`)."""

    def __init__(self, visible: list[str]):
        self.devices: list[Device] = []
        self.problem = ""
        self._handles: dict[str, object] = {}
        self._seen: dict[str, int] = {}  # GPU -> newest utilisation sample seen (us)
        self._open = False
        if not visible:
            return
        try:
            pynvml.nvmlInit()
            self._open = True
        except pynvml.NVMLError as e:
            self.problem = f"NVML unavailable ({_text(e) or type(e).__name__}): no GPU checks for this slot"
            return
        for ordinal, ident in enumerate(visible):
            try:
                if ident.isdigit():
                    handle = pynvml.nvmlDeviceGetHandleByIndex(int(ident))
                else:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(ident)
                uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
                total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            except pynvml.NVMLError as e:
                self.problem = f"NVML cannot reach GPU {ident} ({_text(e)}): no GPU checks for this slot"
                self.devices, self._handles = [], {}
                return
            self.devices.append(Device(uuid, ordinal, total))
            self._handles[uuid] = handle

    @property
    def active(self) -> bool:
        return bool(self.devices)

    def processes(self) -> list[GpuProcess]:
        """Compute processes on the slot's GPUs now. A GPU NVML cannot ask is left out."""
        out = []
        for uuid, handle in self._handles.items():
            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except pynvml.NVMLError:
                continue
            for p in procs:
                used = getattr(p, "usedGpuMemory", None)
                out.append(GpuProcess(uuid, int(p.pid), None if used is None else int(used)))
        return out

    def samples(self) -> list[Sample]:
        """Per-process utilisation samples newer than the last call's (NVML keeps a short
        ring of them). None new on a GPU (NVMLError NOT_FOUND): nothing from it."""
        out = []
        for uuid, handle in self._handles.items():
            try:
                got = pynvml.nvmlDeviceGetProcessUtilization(handle, self._seen.get(uuid, 0))
            except pynvml.NVMLError:
                continue
            for s in got:
                stamp = int(s.timeStamp)
                out.append(Sample(uuid, int(s.pid), stamp, int(s.smUtil), int(s.memUtil)))
                self._seen[uuid] = max(self._seen.get(uuid, 0), stamp)
        return out

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass
