"""The one module that talks to NVML. Everything else sees plain `Gpu` records.

Functions are always called as `pynvml.X` (never imported by name), so tests can fake a GPU box
by patching the `pynvml` module at this single boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import pynvml


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_bytes: int
    cpus: tuple[int, ...] | None  # CPUs close to this GPU, when NVML knows
    healthy: bool = True
    problem: str = ""  # why it is unhealthy


@dataclass(frozen=True)
class GpuScan:
    gpus: tuple[Gpu, ...]
    problem: str = ""  # why there are no GPUs (no driver, NVML error), kept for `status`


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cpu_affinity(handle, cpu_count_hint: int) -> tuple[int, ...] | None:
    """CPUs near the GPU from NVML's affinity bitmask (64-bit words), or None if unknown."""
    words = max(1, (cpu_count_hint + 63) // 64)
    try:
        mask = pynvml.nvmlDeviceGetCpuAffinity(handle, words)
    except (pynvml.NVMLError, AttributeError, TypeError):
        return None
    cpus = [w * 64 + bit for w, word in enumerate(mask) for bit in range(64) if (int(word) >> bit) & 1]
    return tuple(cpus) or None


def _health(handle) -> str:
    """'' if healthy, else what NVML reports wrong (volatile uncorrected ECC errors)."""
    try:
        errors = pynvml.nvmlDeviceGetTotalEccErrors(
            handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
    except (pynvml.NVMLError, AttributeError):
        return ""  # not supported on this card: nothing known to be wrong
    return f"{errors} uncorrected ECC errors" if errors else ""


def scan_gpus(cpu_count_hint: int = 64) -> GpuScan:
    """Every GPU NVML sees. No driver or an NVML failure means no GPUs, with the reason."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return GpuScan((), f"NVML unavailable ({_text(e) or type(e).__name__}): no NVIDIA driver, so no GPU slots")
    try:
        count = pynvml.nvmlDeviceGetCount()
        gpus = []
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            except pynvml.NVMLError as e:
                gpus.append(Gpu(index, f"unknown-{index}", "?", 0, None, False, f"NVML: {_text(e)}"))
                continue
            try:
                name = _text(pynvml.nvmlDeviceGetName(handle))
                memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            except pynvml.NVMLError as e:
                gpus.append(Gpu(index, uuid, "?", 0, None, False, f"NVML: {_text(e)}"))
                continue
            problem = _health(handle)
            gpus.append(Gpu(index, uuid, name, memory, _cpu_affinity(handle, cpu_count_hint),
                            healthy=not problem, problem=problem))
        return GpuScan(tuple(gpus))
    except pynvml.NVMLError as e:
        return GpuScan((), f"NVML failed while listing GPUs: {_text(e)}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


@dataclass(frozen=True)
class GpuUsage:
    index: int
    uuid: str
    utilization: float | None  # busy fraction of the last sample period (0..1), None if unknown
    memory_used_bytes: int | None
    memory_total_bytes: int | None


def gpu_usage() -> list[GpuUsage]:
    """How busy each GPU is now (for metrics); [] without NVML. A GPU NVML cannot read is left out."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    out = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            except pynvml.NVMLError:
                continue
            try:
                busy = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0  # percent
            except (pynvml.NVMLError, AttributeError):
                busy = None
            try:
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                used, total = int(memory.used), int(memory.total)
            except pynvml.NVMLError:
                used = total = None
            out.append(GpuUsage(index, uuid, busy, used, total))
    except pynvml.NVMLError:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return out
