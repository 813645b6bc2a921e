"""gpus.py against the fake NVML (tests/fake_nvml) at the pynvml boundary: topology and MIG."""

from __future__ import annotations

import pynvml
import pytest

from appliance.config import parse_config
from appliance.gpus import NODE, NVLINK, PIX, SYS, UNKNOWN, MigDevice, distance, scan_gpus
from appliance.inventory import Inventory, take_inventory
from appliance.plan import make_plan
from tests.fake_nvml.shim import fake_gpu, install, write_gpus

GiB = 1024**3


@pytest.fixture
def nvml(tmp_path, monkeypatch):
    """Write the fake box with the returned function; pynvml is restored after the test."""
    for name in dir(pynvml):
        if name.startswith("nvml"):
            monkeypatch.setattr(pynvml, name, getattr(pynvml, name))
    path = tmp_path / "gpus.json"
    write_gpus(path, [])
    install(path)
    return lambda gpus: write_gpus(path, gpus)


def test_nvlink_then_pcie_switch_then_numa_node(nvml):
    nvml([fake_gpu(0, nvlink="A", pcie_switch="s0", numa=0), fake_gpu(1, nvlink="A", numa=0),
          fake_gpu(2, nvlink="B", pcie_switch="s0", numa=0), fake_gpu(3, nvlink="B", numa=1)])
    scan = scan_gpus()
    uuid = [g.uuid for g in scan.gpus]
    d = lambda a, b: distance(scan.links, uuid[a], uuid[b])  # noqa: E731
    assert (d(0, 1), d(2, 3), d(1, 0)) == (NVLINK, NVLINK, NVLINK)
    assert d(0, 2) == PIX  # one PCIe switch, no NVLink
    assert d(1, 2) == NODE  # one NUMA node
    assert (d(0, 3), d(1, 3)) == (SYS, SYS)  # across sockets
    assert len(scan.links) == 6  # every pair once


def test_without_topology_support_cpu_affinity_tells_the_numa_node(nvml):
    nvml([fake_gpu(0, cpus=[0, 1]), fake_gpu(1, cpus=[0, 1]), fake_gpu(2, cpus=[2, 3]), fake_gpu(3)])
    scan = scan_gpus()
    uuid = [g.uuid for g in scan.gpus]
    assert distance(scan.links, uuid[0], uuid[1]) == NODE
    assert distance(scan.links, uuid[0], uuid[2]) == SYS
    assert distance(scan.links, uuid[0], uuid[3]) == UNKNOWN  # no affinity either


def test_mig_devices_are_read_with_their_uuid_and_memory(nvml):
    nvml([fake_gpu(0, memory=80 * GiB, mig={"enabled": True, "max": 7, "devices": [
              {"index": 0, "uuid": "MIG-aaaa", "memory": 20 * GiB},
              {"index": 3, "uuid": "MIG-bbbb", "memory": 10 * GiB}]}),  # a hole at 1-2
          fake_gpu(1, mig={"enabled": False}),  # MIG-capable, MIG off
          fake_gpu(2)])  # no MIG at all
    mig, off, plain = scan_gpus().gpus
    assert mig.mig_enabled and mig.healthy
    assert mig.mig_devices == (MigDevice("MIG-aaaa", 20 * GiB, 0), MigDevice("MIG-bbbb", 10 * GiB, 3))
    assert mig.memory_bytes == 80 * GiB  # the whole GPU's
    assert (off.mig_enabled, off.mig_devices, plain.mig_enabled, plain.mig_devices) == (False, (), False, ())


def test_the_fake_answers_mig_calls_like_nvml(nvml):
    nvml([fake_gpu(0), fake_gpu(1, mig={"enabled": True, "devices": [{"uuid": "MIG-x", "memory": GiB}]})])
    pynvml.nvmlInit()
    plain, mig = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml.nvmlDeviceGetHandleByIndex(1)
    with pytest.raises(pynvml.NVMLError) as e:
        pynvml.nvmlDeviceGetMigMode(plain)
    assert e.value.value == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert pynvml.nvmlDeviceGetMaxMigDeviceCount(plain) == 0
    assert pynvml.nvmlDeviceGetMigMode(mig) == [pynvml.NVML_DEVICE_MIG_ENABLE] * 2
    with pytest.raises(pynvml.NVMLError) as e:
        pynvml.nvmlDeviceGetMigDeviceHandleByIndex(mig, 1)
    assert e.value.value == pynvml.NVML_ERROR_NOT_FOUND
    with pytest.raises(pynvml.NVMLError) as e:
        pynvml.nvmlDeviceGetTopologyCommonAncestor(plain, mig)
    assert e.value.value == pynvml.NVML_ERROR_NOT_SUPPORTED


def test_a_mig_device_slot_gets_its_uuid_for_cuda(nvml):
    nvml([fake_gpu(0, mig={"enabled": True, "devices": [{"uuid": "MIG-aaaa", "memory": 10 * GiB}]}),
          fake_gpu(1, nvlink="A"), fake_gpu(2, nvlink="B"), fake_gpu(3, nvlink="A"), fake_gpu(4, nvlink="B")])
    scan = scan_gpus()
    assert take_inventory(scan).gpu_links == scan.links
    inventory = Inventory(cpus=tuple(range(8)), memory_bytes=32 * GiB, gpus=scan.gpus, gpu_links=scan.links)
    plan = make_plan(parse_config("[slots.gpu]\ngpus_per_slot = 2\n"), inventory)
    gpu_slots = [(s.gpus, s.gpu_indexes, s.gpu_memory_bytes) for s in plan.slots if s.kind == "gpu"]
    assert gpu_slots == [(("MIG-aaaa",), (0,), 10 * GiB),
                         (("GPU-fake-0001", "GPU-fake-0003"), (1, 3), 8 * GiB),  # NVLink peers
                         (("GPU-fake-0002", "GPU-fake-0004"), (2, 4), 8 * GiB)]
