"""A request's `gpus` and `gpuMem` are matched against what each slot of the applied plan may
use: its GPU count, and per GPU the memory it may use (a share of a GPU, a MIG device's)."""

from __future__ import annotations

from appliance.config import parse_config
from appliance.gpus import Gpu, MigDevice
from appliance.inventory import Inventory
from appliance.paths import Home
from appliance.plan import make_plan
from appliance.runner.triage import UNKNOWN_GPU_MEMORY, slot_shapes, this_slot
from appliance.studioml.request import Resources, unmet

GiB = 1024**3


def applied(tmp_path, toml: str, gpus) -> Home:
    home = Home.at(tmp_path / "home")
    home.ensure()
    plan = make_plan(parse_config(toml), Inventory(cpus=tuple(range(16)), memory_bytes=64 * GiB, gpus=tuple(gpus)))
    home.plan_file.write_text(plan.to_json())
    return home


def gpu(i, memory_gib=48, mig=()):
    return Gpu(i, f"GPU-{i}", "Fake", memory_gib * GiB, None, mig_enabled=bool(mig),
               mig_devices=tuple(MigDevice(f"MIG-{i}-{n}", g * GiB, n) for n, g in enumerate(mig)))


def fits(shape, gpus: int, gpu_mem_gib: int):
    r = Resources(cpus=1, gpus=gpus, ram_bytes=0, hdd_bytes=0, gpu_mem_bytes=gpu_mem_gib * GiB)
    return unmet(r, cpus=shape.cpus, memory_bytes=shape.memory_bytes, gpus=shape.gpus,
                 gpu_mem_bytes=shape.gpu_mem_bytes, disk_bytes=None)


def test_gpu_memory_of_a_shared_gpu_is_its_share(tmp_path):
    home = applied(tmp_path, "[slots.gpu]\nshare = 2\n", [gpu(0)])
    shared = [s for s in slot_shapes(home) if s.gpus]
    assert len(shared) == 2 and {s.gpu_mem_bytes for s in shared} == {24 * GiB}
    assert fits(shared[0], 1, 16) is None
    assert "needs 32 GiB per gpu, slot's gpus have 24 GiB" in fits(shared[0], 1, 32)


def test_a_mig_slot_offers_its_devices_memory(tmp_path):
    home = applied(tmp_path, "", [gpu(0, 80, mig=(10, 40))])
    assert sorted(s.gpu_mem_bytes for s in slot_shapes(home) if s.gpus) == [10 * GiB, 40 * GiB]


def test_a_request_for_several_gpus_needs_a_slot_that_has_them(tmp_path):
    home = applied(tmp_path, "[slots.gpu]\ngpus_per_slot = 2\n", [gpu(i) for i in range(4)])
    pairs = [s for s in slot_shapes(home) if s.gpus]
    assert [s.gpus for s in pairs] == [2, 2] and {s.gpu_mem_bytes for s in pairs} == {48 * GiB}
    assert fits(pairs[0], 2, 40) is None
    assert "needs 4 gpus, slot has 2" in fits(pairs[0], 4, 1) and "slots.gpu.gpus_per_slot" in fits(pairs[0], 4, 1)


def test_an_older_plan_does_not_say_so_gpu_memory_is_not_checked(tmp_path):
    home = Home.at(tmp_path / "home")
    home.ensure()
    home.plan_file.write_text('{"slots": [{"name": "slot-0", "kind": "gpu", "cpus": [0], "mems": [0], '
                              '"memory_bytes": 1073741824, "shm_bytes": 1, "gpus": ["GPU-0"], "gpu_indexes": [0]}]}')
    assert slot_shapes(home)[0].gpu_mem_bytes == UNKNOWN_GPU_MEMORY


def test_without_a_plan_the_slot_environment_tells(tmp_path):
    home = Home.at(tmp_path / "home")
    env = {"APPLIANCE_SLOT_CPUS": "0-1", "APPLIANCE_SLOT_MEMORY_BYTES": str(GiB),
           "CUDA_VISIBLE_DEVICES": "MIG-abc", "APPLIANCE_GPU_MEMORY_BYTES": str(10 * GiB)}
    shape = this_slot(home, "slot-9", env)
    assert (shape.gpus, shape.gpu_mem_bytes) == (1, 10 * GiB)
