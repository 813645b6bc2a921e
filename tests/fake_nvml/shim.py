"""TEST ONLY: replace pynvml's functions with ones that read a JSON description of GPUs.

Used in-process (tests call `install(path)` with monkeypatch-like effect) and across processes
through `sitecustomize.py` in this folder. Only the pynvml functions appliance/gpus.py calls are
faked; everything above that boundary is the real code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pynvml


def write_gpus(path, gpus: list[dict], fail: str = "") -> None:
    """Describe the fake box atomically (the controller may be reading it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"gpus": gpus, "fail": fail}))
    tmp.replace(path)


def fake_gpu(n: int, **extra) -> dict:
    return {"uuid": f"GPU-fake-{n:04d}", "name": f"Fake GPU {n}", "memory": 8 << 30, "ecc": 0,
            "lost": False, **extra}


def install(path) -> None:
    path = Path(path)
    state = {"data": None}

    def load():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def nvmlInit():
        state["data"] = load()
        if state["data"] is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    def nvmlShutdown():
        pass

    def gpus():
        if state["data"] is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        return state["data"].get("gpus", [])

    def nvmlDeviceGetCount():
        if state["data"] and state["data"].get("fail"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
        return len(gpus())

    def nvmlDeviceGetHandleByIndex(index):
        g = gpus()[index]
        if g.get("lost"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return g

    def nvmlDeviceGetUUID(handle):
        return handle["uuid"]

    def nvmlDeviceGetName(handle):
        return handle.get("name", "Fake GPU")

    class _Memory:
        def __init__(self, total):
            self.total, self.free, self.used = total, total, 0

    def nvmlDeviceGetMemoryInfo(handle):
        return _Memory(int(handle.get("memory", 8 << 30)))

    def nvmlDeviceGetTotalEccErrors(handle, _kind, _counter):
        return int(handle.get("ecc", 0))

    def nvmlDeviceGetCpuAffinity(handle, words):
        cpus = handle.get("cpus")
        if not cpus:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mask = [0] * words
        for c in cpus:
            mask[c // 64] |= 1 << (c % 64)
        return mask

    # nvmlDeviceGetUtilizationRates: percent busy over the last sample period, as NVML's
    # c_nvmlUtilization_t (.gpu, .memory, ints 0..100); a GPU's "utilization" key, default 0
    class _Utilization:
        def __init__(self, gpu, memory):
            self.gpu, self.memory = gpu, memory

    def nvmlDeviceGetUtilizationRates(handle):
        return _Utilization(int(handle.get("utilization", 0)), int(handle.get("memory_utilization", 0)))

    for name, fn in list(locals().items()):
        if name.startswith("nvml"):
            setattr(pynvml, name, fn)
