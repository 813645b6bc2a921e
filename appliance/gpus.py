"""The one module that talks to NVML. Everything else sees plain `Gpu` records.

Functions are always called as `pynvml.X` (never imported by name), so tests can fake a GPU box
by patching the `pynvml` module at this single boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import pynvml


@dataclass(frozen=True)
class MigDevice:
    """One MIG device (a compute instance) of a GPU in MIG mode: a slot of its own."""
    uuid: str  # "MIG-...": what CUDA_VISIBLE_DEVICES takes
    memory_bytes: int
    index: int  # under its GPU (nvmlDeviceGetMigDeviceHandleByIndex)


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_bytes: int
    cpus: tuple[int, ...] | None  # CPUs close to this GPU, when NVML knows
    healthy: bool = True
    problem: str = ""  # why it is unhealthy
    mig_enabled: bool = False  # MIG mode on: only its MIG devices can run work
    mig_devices: tuple[MigDevice, ...] = ()


# How far apart two GPUs are, nearest first (the names are nvidia-smi topo -m's).
NVLINK, BOARD, PIX, PXB, PHB, NODE, SYS, UNKNOWN = range(8)
DISTANCE_NAMES = ("NV", "BOARD", "PIX", "PXB", "PHB", "NODE", "SYS", "?")


@dataclass(frozen=True)
class GpuLink:
    """How close two GPUs are: NVLink between them, else their nearest common PCIe ancestor."""
    a: str  # GPU UUIDs
    b: str
    distance: int  # NVLINK .. UNKNOWN above


@dataclass(frozen=True)
class GpuScan:
    gpus: tuple[Gpu, ...]
    problem: str = ""  # why there are no GPUs (no driver, NVML error), kept for `status`
    links: tuple[GpuLink, ...] = ()  # one per pair of GPUs NVML could open


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


_ANCESTOR = {  # NVML_TOPOLOGY_* -> distance
    "NVML_TOPOLOGY_INTERNAL": BOARD, "NVML_TOPOLOGY_SINGLE": PIX, "NVML_TOPOLOGY_MULTIPLE": PXB,
    "NVML_TOPOLOGY_HOSTBRIDGE": PHB, "NVML_TOPOLOGY_NODE": NODE, "NVML_TOPOLOGY_SYSTEM": SYS,
}


def _distance(h1, h2, g1: Gpu, g2: Gpu) -> int:
    """NVLink peer-to-peer first; else the PCIe common ancestor; else same CPU affinity (NUMA)."""
    try:
        if pynvml.nvmlDeviceGetP2PStatus(h1, h2, pynvml.NVML_P2P_CAPS_INDEX_NVLINK) == pynvml.NVML_P2P_STATUS_OK:
            return NVLINK
    except (pynvml.NVMLError, AttributeError):
        pass
    try:
        level = pynvml.nvmlDeviceGetTopologyCommonAncestor(h1, h2)
        for name, distance in _ANCESTOR.items():
            if level == getattr(pynvml, name):
                return distance
    except (pynvml.NVMLError, AttributeError):
        pass
    if g1.cpus is None or g2.cpus is None:
        return UNKNOWN
    return NODE if g1.cpus == g2.cpus else SYS


def _links(opened: list) -> tuple[GpuLink, ...]:
    return tuple(GpuLink(g1.uuid, g2.uuid, _distance(h1, h2, g1, g2))
                 for i, (g1, h1) in enumerate(opened) for g2, h2 in opened[i + 1:])


def _mig(handle) -> tuple[bool, tuple[MigDevice, ...]]:
    """(MIG mode on, its MIG devices). A GPU without MIG answers NOT_SUPPORTED: MIG off.
    Other NVML errors propagate: the GPU's layout is unknown, so it counts as unhealthy."""
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except pynvml.NVMLError as e:
        if e.value in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):  # old driver
            return False, ()
        raise
    if current != pynvml.NVML_DEVICE_MIG_ENABLE:
        return False, ()
    devices = []
    for i in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i)
        except pynvml.NVMLError as e:
            if e.value == pynvml.NVML_ERROR_NOT_FOUND:
                continue  # no MIG device at this index: indexes may have holes
            raise
        devices.append(MigDevice(_text(pynvml.nvmlDeviceGetUUID(mig)),
                                 int(pynvml.nvmlDeviceGetMemoryInfo(mig).total), i))
    return True, tuple(devices)


def scan_gpus(cpu_count_hint: int = 64) -> GpuScan:
    """Every GPU NVML sees, its MIG devices, and how close GPUs are to each other.
    No driver or an NVML failure means no GPUs, with the reason."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return GpuScan((), f"NVML unavailable ({_text(e) or type(e).__name__}): no NVIDIA driver, so no GPU slots")
    try:
        count = pynvml.nvmlDeviceGetCount()
        gpus = []
        opened = []  # (Gpu, handle) of the healthy ones, for the topology
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
            try:
                mig_enabled, mig_devices = _mig(handle)
            except pynvml.NVMLError as e:
                gpus.append(Gpu(index, uuid, name, memory, None, False, f"NVML listing MIG devices: {_text(e)}"))
                continue
            problem = _health(handle)
            gpu = Gpu(index, uuid, name, memory, _cpu_affinity(handle, cpu_count_hint),
                      healthy=not problem, problem=problem, mig_enabled=mig_enabled, mig_devices=mig_devices)
            gpus.append(gpu)
            if gpu.healthy:
                opened.append((gpu, handle))
        return GpuScan(tuple(gpus), links=_links(opened))
    except pynvml.NVMLError as e:
        return GpuScan((), f"NVML failed while listing GPUs: {_text(e)}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def distance(links, a: str, b: str) -> int:
    """How far apart GPUs `a` and `b` (UUIDs) are, from a scan's links; UNKNOWN when not known."""
    for link in links:
        if {link.a, link.b} == {a, b}:
            return link.distance
    return UNKNOWN


@dataclass(frozen=True)
class GpuUsage:
    index: int
    uuid: str
    utilization: int | None  # percent of the last sample period the GPU was busy, None if unknown
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    problem: str = ""  # why NVML could not answer for this GPU


def gpu_usage(indexes=None) -> list[GpuUsage]:
    """How busy these GPUs (NVML indexes; None: all) are now, for `appliance top` and metrics.
    Without NVML, every asked-for GPU comes back with the problem (none when all were asked)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return [GpuUsage(i, "", None, None, None, f"NVML unavailable: {_text(e)}") for i in indexes or ()]
    out = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()) if indexes is None else indexes:
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            except pynvml.NVMLError as e:
                out.append(GpuUsage(index, "", None, None, None, f"NVML: {_text(e)}"))
                continue
            try:
                busy = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except (pynvml.NVMLError, AttributeError):
                busy = None  # not supported on this card (or a MIG device)
            out.append(GpuUsage(index, uuid, busy, int(memory.used), int(memory.total)))
    except pynvml.NVMLError:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return out
