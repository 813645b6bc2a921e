"""TEST ONLY. Fakes NVML at the pynvml boundary for processes the tests start (the controller
under supervisord, `appliance status`): put this folder first on PYTHONPATH and point
APPLIANCE_FAKE_NVML at a JSON file, which is re-read on every nvmlInit:

    {"gpus": [{"uuid": "GPU-1", "name": "Fake", "memory": 8589934592, "ecc": 0,
               "lost": false, "memory_used": 0}],   # memory_used (optional): bytes in use
     "fail": ""}          # non-empty: nvmlDeviceGetCount raises NVMLError (NVML failing mid-poll)

Topology and MIG, optional fields of a GPU (all absent: topology calls raise NOT_SUPPORTED,
nvmlDeviceGetMigMode raises NOT_SUPPORTED as on a GPU without MIG):

    "nvlink": "A"        # GPUs with the same value are NVLink peers (nvmlDeviceGetP2PStatus
                         # with NVML_P2P_CAPS_INDEX_NVLINK answers NVML_P2P_STATUS_OK)
    "pcie_switch": "s0"  # same value: nvmlDeviceGetTopologyCommonAncestor = NVML_TOPOLOGY_SINGLE,
    "numa": 0            # else same "numa" (default 0): NVML_TOPOLOGY_NODE, else _SYSTEM
    "mig": {"enabled": true, "pending": 1, "max": 7,        # MIG-capable; "pending" defaults to
            "devices": [{"index": 0, "uuid": "MIG-...",     # the current mode; "index" to the
                         "memory": 10737418240}]}           # place in the list; memory in bytes

Processes (re-read on every call, so a test can change them while NVML is open): a GPU's
"processes": [{"pid": 123, "used_memory": 5000000000, "sm_util": 40, "mem_util": 10}] drive
nvmlDeviceGetHandleByUUID, nvmlDeviceGetComputeRunningProcesses (.pid, .usedGpuMemory in bytes,
None when "used_memory" is null: NVML cannot say) and nvmlDeviceGetProcessUtilization (one
sample per process stamped now: .pid, .timeStamp, .smUtil, .memUtil; NVMLError NOT_FOUND when
there is none newer than the time stamp asked for).

A missing or unreadable file means "no driver" (NVMLError_LibraryNotFound), like a host
without NVIDIA. Nothing happens unless APPLIANCE_FAKE_NVML is set.
"""

import os

if os.environ.get("APPLIANCE_FAKE_NVML"):
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "_appliance_fake_nvml", os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim.py"))
    _shim = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_shim)
    _shim.install(os.environ["APPLIANCE_FAKE_NVML"])
