"""Host inventory on this machine, and the NVML layer with pynvml faked at its boundary."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pynvml
import pytest

from appliance.gpus import scan_gpus
from appliance.inventory import take_inventory

GiB = 1024**3


class FakeNvml:
    """Patches pynvml's functions the way a GPU box would answer them."""

    def __init__(self, monkeypatch, gpus, init_error=None, fail_at=None):
        self.gpus = gpus
        m = monkeypatch

        def init():
            if init_error:
                raise init_error

        def handle(i):
            if fail_at == i:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            return i

        m.setattr(pynvml, "nvmlInit", init)
        m.setattr(pynvml, "nvmlShutdown", lambda: None)
        m.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(gpus))
        m.setattr(pynvml, "nvmlDeviceGetHandleByIndex", handle)
        m.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: gpus[h]["uuid"])
        m.setattr(pynvml, "nvmlDeviceGetName", lambda h: gpus[h]["name"])
        m.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: SimpleNamespace(total=gpus[h]["memory"]))
        m.setattr(pynvml, "nvmlDeviceGetCpuAffinity", lambda h, words: gpus[h]["mask"])

        def ecc(h, *_):
            if gpus[h].get("ecc") is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return gpus[h]["ecc"]

        m.setattr(pynvml, "nvmlDeviceGetTotalEccErrors", ecc)

        def not_supported(*_):  # what a GPU without MIG or topology support answers
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

        for name in ("nvmlDeviceGetMigMode", "nvmlDeviceGetTopologyCommonAncestor", "nvmlDeviceGetP2PStatus"):
            m.setattr(pynvml, name, not_supported)


def test_two_gpus_with_affinity_bytes_names_and_one_with_ecc_errors(monkeypatch):
    FakeNvml(monkeypatch, [
        {"uuid": b"GPU-aaaa", "name": b"NVIDIA A100", "memory": 80 * GiB, "mask": [0x0F], "ecc": 0},
        {"uuid": "GPU-bbbb", "name": "NVIDIA A100", "memory": 80 * GiB, "mask": [0, 0x3], "ecc": 7},
    ])
    scan = scan_gpus(cpu_count_hint=128)
    assert scan.problem == ""
    first, second = scan.gpus
    assert (first.index, first.uuid, first.name, first.memory_bytes) == (0, "GPU-aaaa", "NVIDIA A100", 80 * GiB)
    assert first.cpus == (0, 1, 2, 3) and first.healthy
    assert second.cpus == (64, 65)  # the second 64-bit word of the mask
    assert not second.healthy and "7 uncorrected ECC errors" in second.problem


def test_no_driver_means_no_gpus_with_the_reason(monkeypatch):
    FakeNvml(monkeypatch, [], init_error=pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    scan = scan_gpus()
    assert scan.gpus == ()
    assert "NVML unavailable" in scan.problem and "no GPU slots" in scan.problem


def test_a_gpu_lost_mid_listing_is_reported_unhealthy_not_raised(monkeypatch):
    FakeNvml(monkeypatch, [
        {"uuid": "GPU-aaaa", "name": "T4", "memory": 16 * GiB, "mask": [1]},
        {"uuid": "GPU-bbbb", "name": "T4", "memory": 16 * GiB, "mask": [2]},
    ], fail_at=1)
    first, lost = scan_gpus().gpus
    assert first.healthy and first.cpus == (0,)  # ECC not supported: nothing known wrong
    assert not lost.healthy and "NVML" in lost.problem


def test_inventory_of_this_host():
    inventory = take_inventory()
    assert list(inventory.cpus) == sorted(os.sched_getaffinity(0))
    assert 0 < inventory.memory_bytes <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert inventory.cgroup_version in ("v1", "v2", "hybrid", "none")
    assert set(inventory.numa_of_cpu) == set(inventory.cpus)


def test_inventory_takes_the_gpus_it_is_given(monkeypatch):
    FakeNvml(monkeypatch, [{"uuid": "GPU-x", "name": "L4", "memory": 24 * GiB, "mask": [1]}])
    inventory = take_inventory()
    assert [g.uuid for g in inventory.gpus] == ["GPU-x"] and inventory.gpu_problem == ""


@pytest.mark.parametrize("cpus", [[0], [1]])
def test_inventory_follows_a_restricted_affinity(cpus):
    if not set(cpus) <= os.sched_getaffinity(0):
        pytest.skip("CPU not available here")
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        assert list(take_inventory().cpus) == cpus
    finally:
        os.sched_setaffinity(0, saved)
