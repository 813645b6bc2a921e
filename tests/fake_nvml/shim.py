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

    class _Memory:  # "memory_used": what the driver and processes hold (a real idle card holds some)
        def __init__(self, total, used):
            self.total, self.free, self.used = total, total - used, used

    def nvmlDeviceGetMemoryInfo(handle):
        return _Memory(int(handle.get("memory", 8 << 30)), int(handle.get("memory_used", 0)))

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

    # -- topology and MIG (slots of several GPUs, MIG devices as slots) ---------------------
    # GPU fields: "nvlink" (GPUs with the same value are NVLink peers), "pcie_switch" (same value:
    # behind one PCIe switch), "numa" (the NUMA node of the GPU's root port); "mig" (see
    # sitecustomize.py). Without any of the three, topology is not supported (like some VMs).

    def nvmlDeviceGetP2PStatus(device1, device2, p2pIndex):
        if p2pIndex == pynvml.NVML_P2P_CAPS_INDEX_NVLINK:
            same = device1.get("nvlink") is not None and device1.get("nvlink") == device2.get("nvlink")
            return pynvml.NVML_P2P_STATUS_OK if same else pynvml.NVML_P2P_STATUS_NOT_SUPPORTED
        return pynvml.NVML_P2P_STATUS_OK

    def nvmlDeviceGetTopologyCommonAncestor(device1, device2):
        keys = ("nvlink", "pcie_switch", "numa")
        if not any(k in d for d in (device1, device2) for k in keys):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if device1.get("pcie_switch") is not None and device1.get("pcie_switch") == device2.get("pcie_switch"):
            return pynvml.NVML_TOPOLOGY_SINGLE
        if device1.get("numa", 0) == device2.get("numa", 0):
            return pynvml.NVML_TOPOLOGY_NODE
        return pynvml.NVML_TOPOLOGY_SYSTEM

    def _mig(device):
        mig = device.get("mig")
        if mig is None or device.get("is_mig_device"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return mig

    def nvmlDeviceGetMigMode(device):
        mig = _mig(device)
        current = pynvml.NVML_DEVICE_MIG_ENABLE if mig.get("enabled") else pynvml.NVML_DEVICE_MIG_DISABLE
        pending = mig.get("pending", current)
        return [current, pending]

    def nvmlDeviceGetMaxMigDeviceCount(device):
        mig = device.get("mig")  # "zero if MIG is not supported or enabled"
        return int(mig.get("max", 7)) if mig and mig.get("enabled") and not device.get("is_mig_device") else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(device, index):
        mig = _mig(device)
        if not mig.get("enabled"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= index < int(mig.get("max", 7)):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for n, d in enumerate(mig.get("devices", [])):
            if d.get("index", n) == index:
                return {"memory": 1 << 30, **d, "is_mig_device": True}
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    # -- utilisation (appliance top): a gpu's "util" (percent busy, default 0) and "memory_util"
    class _Utilization:  # nvmlUtilization_t: .gpu and .memory, percent of the last sample period
        def __init__(self, gpu, memory):
            self.gpu, self.memory = gpu, memory

    def nvmlDeviceGetUtilizationRates(handle):
        return _Utilization(int(handle.get("util", 0)), int(handle.get("memory_util", 0)))

    for name, fn in list(locals().items()):
        if name.startswith("nvml"):
            setattr(pynvml, name, fn)
    install_processes(path)


# -- processes: who uses a GPU, how much memory, how busy (the runner's GPU watch) -----------
# GPU field "processes": [{"pid": 123, "used_memory": 5e9 (bytes, null: NVML cannot say),
# "sm_util": 40, "mem_util": 10}] (percent). Unlike the rest, these are read from the file on
# every call (a process list is live in real NVML too), so a test can add and remove
# processes while a runner holds NVML open.

def install_processes(path) -> None:
    path = Path(path)

    def devices():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED) from None
        for g in data.get("gpus", []):
            yield g
            for d in (g.get("mig") or {}).get("devices", []) if (g.get("mig") or {}).get("enabled") else ():
                yield {"memory": 1 << 30, **d, "is_mig_device": True}

    def live(handle):
        for d in devices():
            if d.get("uuid") == handle.get("uuid"):
                if d.get("lost"):
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
                return d
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    def nvmlDeviceGetHandleByUUID(uuid):
        uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        for d in devices():
            if d.get("uuid") == uuid:
                if d.get("lost"):
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
                return d
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    class _Process:  # pynvml's friendly object of c_nvmlProcessInfo_v3_t
        def __init__(self, p):
            self.pid = int(p["pid"])
            used = p.get("used_memory")
            self.usedGpuMemory = None if used is None else int(used)
            self.gpuInstanceId = self.computeInstanceId = 0xFFFFFFFF

    def nvmlDeviceGetComputeRunningProcesses(handle):
        return [_Process(p) for p in live(handle).get("processes", [])]

    class _Sample:  # c_nvmlProcessUtilizationSample_t
        def __init__(self, p, stamp):
            self.pid, self.timeStamp = int(p["pid"]), stamp
            self.smUtil, self.memUtil = int(p.get("sm_util", 0)), int(p.get("mem_util", 0))
            self.encUtil = self.decUtil = 0

    def nvmlDeviceGetProcessUtilization(handle, timeStamp):
        """One sample per process, stamped now (microseconds); none newer than timeStamp:
        NVMLError NOT_FOUND, as the real call answers."""
        import time
        stamp = int(time.time() * 1e6)
        procs = live(handle).get("processes", [])
        if not procs or stamp <= int(timeStamp):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return [_Sample(p, stamp) for p in procs]

    for name, fn in list(locals().items()):
        if name.startswith("nvml"):
            setattr(pynvml, name, fn)
