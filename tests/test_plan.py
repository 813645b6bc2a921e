"""Table tests of the planner: pure, no processes."""

import pytest

from appliance.config import parse_config
from appliance.gpus import Gpu
from appliance.inventory import Inventory, format_cpu_list, parse_cpu_list
from appliance.plan import Plan, PlanError, diff_plans, make_plan

GiB = 1024**3


def host(cpus, memory_gib=32, gpus=(), numa=None):
    cpus = parse_cpu_list(cpus) if isinstance(cpus, str) else list(cpus)
    numa = numa or {}
    return Inventory(cpus=tuple(cpus), memory_bytes=memory_gib * GiB,
                     numa_of_cpu={c: numa.get(c, 0) for c in cpus}, gpus=tuple(gpus))


def gpu(index, cpus=None, healthy=True):
    return Gpu(index=index, uuid=f"GPU-{index:04d}", name="Fake A100", memory_bytes=80 * GiB,
               cpus=tuple(parse_cpu_list(cpus)) if cpus else None, healthy=healthy,
               problem="" if healthy else "12 uncorrected ECC errors")


def config(text=""):
    return parse_config(text)


def test_two_core_laptop_without_gpu_keeps_one_core_back():
    plan = make_plan(config(), host("0-1", memory_gib=8))
    assert plan.reserved_cpus == (0,)
    assert [(s.name, s.kind, s.cpus) for s in plan.slots] == [("slot-0", "cpu", (1,))]
    slot = plan.slots[0]
    left = 8 * GiB - plan.reserved_memory  # one CPU left: all the memory left, in whole MiB
    assert left - 1024**2 < slot.memory_bytes <= left and slot.memory_bytes % 1024**2 == 0
    assert slot.shm_bytes == slot.memory_bytes // 4
    assert slot.gpus == ()


def test_one_core_box_reserves_nothing():
    plan = make_plan(config(), host("0", memory_gib=4))
    assert plan.reserved_cpus == ()
    assert [s.cpus for s in plan.slots] == [(0,)]


def test_64_cores_8_gpus_on_two_numa_nodes():
    numa = {c: 0 if c < 32 else 1 for c in range(64)}
    gpus = [gpu(i, "0-31" if i < 4 else "32-63") for i in range(8)]
    plan = make_plan(config(), host("0-63", memory_gib=512, gpus=gpus, numa=numa))
    gpu_slots = [s for s in plan.slots if s.kind == "gpu"]
    cpu_slots = [s for s in plan.slots if s.kind == "cpu"]
    assert plan.reserved_cpus == (0, 1)
    assert len(gpu_slots) == 8
    for s in gpu_slots:
        assert len(s.cpus) == 3  # 62 CPUs left // (2 * 8 GPUs)
        node = 0 if s.gpu_indexes[0] < 4 else 1
        assert all(numa[c] == node for c in s.cpus), (s.name, s.cpus)  # close to its GPU
        assert s.mems == (node,)
    assert len(cpu_slots) == 62 - 24
    all_cpus = [c for s in plan.slots for c in s.cpus] + list(plan.reserved_cpus)
    assert sorted(all_cpus) == list(range(64))  # every CPU used once: never oversubscribed
    assert sum(s.memory_bytes for s in plan.slots) <= 512 * GiB - plan.reserved_memory
    assert sorted(u for s in gpu_slots for u in s.gpus) == [f"GPU-{i:04d}" for i in range(8)]


@pytest.mark.parametrize("cpus, expected_slot_cpus", [
    ("0,2,4-5,7", [(2,), (4,), (5,), (7,)]),  # offline cores: holes in the list
    ("8-11", [(9,), (10,), (11,)]),  # a restricted cpuset that starts high
])
def test_odd_cpu_lists(cpus, expected_slot_cpus):
    plan = make_plan(config(), host(cpus))
    assert [s.cpus for s in plan.slots] == expected_slot_cpus


def test_two_cpus_per_slot_and_explicit_sizes():
    plan = make_plan(config('[host]\nreserved_cpus = 0\n[slots.cpu]\ncpus = 2\nmemory = "4GiB"\nshm = "1GiB"\n'),
                     host("0-7"))
    assert [format_cpu_list(s.cpus) for s in plan.slots] == ["0-1", "2-3", "4-5", "6-7"]
    assert {(s.memory_bytes, s.shm_bytes) for s in plan.slots} == {(4 * GiB, 1 * GiB)}


def test_unhealthy_and_disabled_gpus_get_no_slot():
    gpus = [gpu(0), gpu(1, healthy=False), gpu(2)]
    plan = make_plan(config('[gpus]\ndisabled = ["GPU-0002"]\n'), host("0-15", gpus=gpus))
    assert [s.gpu_indexes for s in plan.slots if s.kind == "gpu"] == [(0,)]
    assert any("GPU 1" in n and "ECC" in n for n in plan.notes)
    assert any("GPU 2" in n and "disabled" in n for n in plan.notes)


@pytest.mark.parametrize("toml, inventory, message", [
    ('[slots.cpu]\ncount = 8\n', host("0-3"), "slots.cpu.count = 8"),
    ('[host]\nreserved_cpus = 4\n', host("0-3"), "host.reserved_cpus = 4"),
    ('[slots.cpu]\nmemory = "64GiB"\n', host("0-3", memory_gib=32), "slots ask for"),
    ('[slots.cpu]\nshm = "20GiB"\n', host("0-3", memory_gib=32), "slots.cpu.shm"),
    ('[slots.gpu]\ncpus = 8\n', host("0-7", gpus=[gpu(0), gpu(1)]), "slots.gpu.cpus = 8"),
    ('[host]\nreserved_memory = "64GiB"\n', host("0-3", memory_gib=32), "host.reserved_memory"),
    ('[slots.cpu]\ncount = 0\n', host("0-3"), "no slot"),
])
def test_asking_for_more_than_the_host_has_is_a_clear_error(toml, inventory, message):
    with pytest.raises(PlanError, match=message.replace(".", r"\.")):
        make_plan(config(toml), inventory)


def test_replan_keeps_slots_when_nothing_changed():
    inv = host("0-7", gpus=[gpu(0, "0-3")])
    first = make_plan(config(), inv)
    again = make_plan(config(), inv, first)
    assert again == first
    assert not diff_plans(first, again)


def test_losing_a_gpu_removes_only_its_slot_and_frees_its_cpus():
    gpus = [gpu(0, "0-7"), gpu(1, "0-7")]
    before = make_plan(config(), host("0-7", gpus=gpus))
    after = make_plan(config(), host("0-7", gpus=gpus[:1]), before)
    lost = next(s for s in before.slots if s.gpus == ("GPU-0001",))
    diff = diff_plans(before, after)
    assert diff.removed == (lost.name,)
    assert diff.changed == ()
    # every slot that survived kept its CPUs; the lost GPU's CPUs became CPU slots
    for s in after.slots:
        old = before.slot(s.name)
        assert old is None or old == s
    assert set(lost.cpus) <= {c for s in after.slots if s.name in diff.added for c in s.cpus}


def test_gaining_a_gpu_takes_cpus_from_as_few_cpu_slots_as_needed():
    before = make_plan(config(), host("0-7", gpus=[]))
    after = make_plan(config(), host("0-7", gpus=[gpu(0, "4-7")]), before)
    diff = diff_plans(before, after)
    new_gpu = next(s for s in after.slots if s.kind == "gpu")
    assert new_gpu.name in diff.added
    assert set(new_gpu.cpus) <= set(range(4, 8))  # near the GPU
    assert len(diff.removed) == len(new_gpu.cpus)  # one CPU slot per CPU it needed
    assert diff.changed == ()


def test_plan_round_trips_through_json():
    plan = make_plan(config(), host("0-7", gpus=[gpu(0, "0-3")]))
    assert Plan.from_json(plan.to_json()) == plan


def test_cpu_list_format_round_trip():
    assert format_cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    with pytest.raises(ValueError):
        parse_cpu_list("0-x")


def test_a_gpu_turning_unhealthy_leaves_the_other_gpu_slots_alone():
    gpus = [gpu(0, "0-7"), gpu(1, "0-7")]
    before = make_plan(config(), host("0-7", gpus=gpus))
    after = make_plan(config(), host("0-7", gpus=[gpus[0], gpu(1, "0-7", healthy=False)]), before)
    diff = diff_plans(before, after)
    assert diff.changed == ()
    assert [before.slot(n).gpu_indexes for n in diff.removed] == [(1,)]
