"""Table tests of the planner: pure, no processes."""

import re

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


# ---------------------------------------------------------------- several GPUs, shares, MIG

from appliance.config import ConfigError  # noqa: E402
from appliance.gpus import NVLINK, PIX, SYS, GpuLink, MigDevice  # noqa: E402


def box(islands, memory_gib=512, cpus="0-63", mig=None, unhealthy=()):
    """A host with NVLink islands (lists of GPU indexes), each on its own NUMA node (32 CPUs
    each); across islands GPUs are SYS apart. `mig`: index -> MIG devices (GiB each)."""
    numa = {c: c // 32 for c in range(64)}
    gpus, where = [], {}
    for node, island in enumerate(islands):
        for i in island:
            where[i] = node
    mig = mig or {}
    for i in sorted(where):
        node_cpus = f"{where[i] * 32}-{where[i] * 32 + 31}"
        devices = tuple(MigDevice(f"MIG-{i}-{n}", gib * GiB, n) for n, gib in enumerate(mig.get(i, ()))
                        if gib is not None)  # None: a hole in the MIG device indexes
        g = gpu(i, node_cpus, healthy=i not in unhealthy)
        gpus.append(Gpu(g.index, g.uuid, g.name, g.memory_bytes, g.cpus, g.healthy, g.problem,
                        mig_enabled=i in mig, mig_devices=devices))
    links = tuple(GpuLink(f"GPU-{a:04d}", f"GPU-{b:04d}", NVLINK if where[a] == where[b] else SYS)
                  for a in where for b in where if a < b)
    inv = host(cpus, memory_gib=memory_gib, gpus=gpus, numa=numa)
    return Inventory(cpus=inv.cpus, memory_bytes=inv.memory_bytes, numa_of_cpu=inv.numa_of_cpu,
                     gpus=inv.gpus, gpu_links=links)


ISLANDS = [[0, 2, 4, 6], [1, 3, 5, 7]]  # interleaved: grouping by index would straddle them


def gpu_slots(plan):
    return [s for s in plan.slots if s.kind == "gpu"]


def island_of(index):
    return 0 if index in ISLANDS[0] else 1


@pytest.mark.parametrize("per_slot", [2, 4])
def test_slots_of_several_gpus_never_straddle_nvlink_islands(per_slot):
    plan = make_plan(config(f"[slots.gpu]\ngpus_per_slot = {per_slot}\n"), box(ISLANDS))
    slots = gpu_slots(plan)
    assert len(slots) == 8 // per_slot
    assert sorted(i for s in slots for i in s.gpu_indexes) == list(range(8))  # every GPU, once
    for s in slots:
        assert len(s.gpus) == per_slot and len({island_of(i) for i in s.gpu_indexes}) == 1, s
        assert s.gpus == tuple(f"GPU-{i:04d}" for i in s.gpu_indexes)  # CUDA_VISIBLE_DEVICES
        assert s.gpu_memory_bytes == 80 * GiB and s.gpu_share == 1
        assert len(s.cpus) == 3 * per_slot  # "auto": 3 per GPU here (62 CPUs // 16), k times
        assert s.mems == (island_of(s.gpu_indexes[0]),)  # CPUs on the GPUs' NUMA node
    assert make_plan(config(f"[slots.gpu]\ngpus_per_slot = {per_slot}\n"), box(ISLANDS), plan) == plan


def test_a_list_of_slot_sizes_keeps_each_slot_on_one_island():
    plan = make_plan(config("[slots.gpu]\ngpus_per_slot = [4, 2, 2]\n"), box(ISLANDS))
    slots = gpu_slots(plan)
    assert sorted(len(s.gpus) for s in slots) == [2, 2, 4]
    assert all(len({island_of(i) for i in s.gpu_indexes}) == 1 for s in slots)


def test_without_nvlink_a_pcie_switch_groups_gpus():
    gpus = [gpu(i, "0-15") for i in range(4)]
    links = tuple(GpuLink(f"GPU-{a:04d}", f"GPU-{b:04d}", PIX if a % 2 == b % 2 else SYS)
                  for a in range(4) for b in range(4) if a < b)
    inv = host("0-15", memory_gib=64, gpus=gpus)
    inv = Inventory(cpus=inv.cpus, memory_bytes=inv.memory_bytes, numa_of_cpu=inv.numa_of_cpu, gpus=inv.gpus,
                    gpu_links=links)
    plan = make_plan(config("[slots.gpu]\ngpus_per_slot = 2\n"), inv)
    assert sorted(s.gpu_indexes for s in gpu_slots(plan)) == [(0, 2), (1, 3)]


def test_a_gpu_lost_from_a_pair_drains_only_that_pair_and_comes_back():
    cfg = config("[slots.gpu]\ngpus_per_slot = 2\n")
    before = make_plan(cfg, box(ISLANDS))
    after = make_plan(cfg, box(ISLANDS, unhealthy={2}), before)
    lost = next(s for s in gpu_slots(before) if 2 in s.gpu_indexes)
    partner = next(i for i in lost.gpu_indexes if i != 2)
    diff = diff_plans(before, after)
    assert diff.removed == (lost.name,) and diff.changed == ()
    assert all(after.slot(s.name) == s for s in before.slots if s.name != lost.name)  # untouched
    assert any(f"GPU {partner} " in n and "gpus_per_slot" in n for n in after.notes)  # idle, and why
    assert all(partner not in s.gpu_indexes for s in after.slots)
    back = make_plan(cfg, box(ISLANDS), after)
    diff = diff_plans(after, back)
    assert diff.changed == () and all(after.slot(n).kind == "cpu" for n in diff.removed)  # CPUs for it
    assert [back.slot(n).gpu_indexes for n in diff.added if back.slot(n).kind == "gpu"] == [lost.gpu_indexes]


def test_a_gpu_gone_from_nvmls_list_counts_as_lost_until_the_gpus_fit_by_themselves():
    cfg = config("[slots.gpu]\ngpus_per_slot = 2\n")
    without_2 = [[0, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(PlanError, match="cannot split this host's 7 GPUs"):
        make_plan(cfg, box(without_2))  # no earlier plan: 7 GPUs cannot make pairs
    before = make_plan(cfg, box(ISLANDS))
    after = make_plan(cfg, box(without_2), before)
    lost = next(s for s in gpu_slots(before) if 2 in s.gpu_indexes)
    assert diff_plans(before, after).removed == (lost.name,) and diff_plans(before, after).changed == ()
    assert after.gpus_gone == ("GPU-0002",) and any("GPU-0002 left NVML's list" in n for n in after.notes)
    assert make_plan(cfg, box(without_2), after) == after  # stays so on the next re-plan
    assert Plan.from_json(after.to_json()) == after
    back = make_plan(cfg, box(ISLANDS), after)
    assert back.gpus_gone == () and lost.gpu_indexes in {s.gpu_indexes for s in gpu_slots(back)}


def test_two_pairs_losing_a_gpu_each_pair_their_survivors():
    cfg = config("[slots.gpu]\ngpus_per_slot = 2\n")
    before = make_plan(cfg, box(ISLANDS))
    pairs = {s.gpu_indexes for s in gpu_slots(before)}
    after = make_plan(cfg, box(ISLANDS, unhealthy={2, 7}), before)
    survivors = tuple(sorted(i for p in pairs if 2 in p or 7 in p for i in p if i not in (2, 7)))
    assert {s.gpu_indexes for s in gpu_slots(after)} == {p for p in pairs if 2 not in p and 7 not in p} | {survivors}
    assert diff_plans(before, after).changed == ()


@pytest.mark.parametrize("share", [2, 3])
def test_a_shared_gpu_makes_slots_with_a_share_of_its_memory(share):
    cfg = config(f"[slots.gpu]\nshare = {share}\n")
    plan = make_plan(cfg, box([[0, 1]]))
    slots = gpu_slots(plan)
    assert len(slots) == 2 * share
    for i in (0, 1):
        mine = [s for s in slots if s.gpu_indexes == (i,)]
        assert len(mine) == share and {s.gpus for s in mine} == {(f"GPU-{i:04d}",)}
        assert {s.gpu_share for s in mine} == {share}
        assert {s.gpu_memory_bytes for s in mine} == {80 * GiB // share - (80 * GiB // share) % 1024**2}
        assert {len(s.cpus) for s in mine} == {4 // share}  # 1/share of the 4 a whole GPU gets
    assert len({c for s in slots for c in s.cpus}) == sum(len(s.cpus) for s in slots)  # CPUs not shared
    again = make_plan(cfg, box([[0, 1]]), plan)
    assert again == plan
    one_lost = make_plan(cfg, box([[0, 1]], unhealthy={1}), plan)
    diff = diff_plans(plan, one_lost)
    assert sorted(diff.removed) == sorted(s.name for s in slots if s.gpu_indexes == (1,)) and diff.changed == ()


def test_mig_devices_are_slots_and_a_layout_change_replans_only_them():
    inv = box([[0, 1]], mig={0: (10, 10, 40)})
    plan = make_plan(config(), inv)
    slots = gpu_slots(plan)
    mig = [s for s in slots if s.gpu_indexes == (0,)]
    assert [s.gpus for s in mig] == [("MIG-0-0",), ("MIG-0-1",), ("MIG-0-2",)]
    assert [s.gpu_memory_bytes for s in mig] == [10 * GiB, 10 * GiB, 40 * GiB]
    assert [len(s.cpus) for s in mig] == [1, 1, 2]  # their part of the GPU's 4 CPUs, at least 1
    whole = next(s for s in slots if s.gpu_indexes == (1,))
    assert whole.gpus == ("GPU-0001",) and whole.gpu_memory_bytes == 80 * GiB

    # the 40 GiB instance is split in two: only it goes, two new slots come
    relaid = make_plan(config(), box([[0, 1]], mig={0: (10, 10, None, 20, 20)}), plan)
    diff = diff_plans(plan, relaid)
    assert [n for n in diff.removed if plan.slot(n).kind == "gpu"] == [mig[2].name] and diff.changed == ()
    assert sorted(relaid.slot(n).gpus for n in diff.added if relaid.slot(n).kind == "gpu") == \
        [("MIG-0-3",), ("MIG-0-4",)]

    # MIG off again: the GPU is one slot
    off = make_plan(config(), box([[0, 1]]), relaid)
    assert [s.gpus for s in gpu_slots(off) if s.gpu_indexes == (0,)] == [("GPU-0000",)]


def test_mig_mode_without_devices_is_noted():
    plan = make_plan(config(), box([[0, 1]], mig={0: ()}))
    assert [s.gpu_indexes for s in gpu_slots(plan)] == [(1,)]
    assert any("GPU 0" in n and "MIG mode with no MIG device" in n for n in plan.notes)


@pytest.mark.parametrize("toml, inventory, message", [
    ("[slots.gpu]\ngpus_per_slot = 3\n", box([[0, 1, 2, 3]]), "slots.gpu.gpus_per_slot = 3 cannot split"),
    ("[slots.gpu]\ngpus_per_slot = [4, 2, 2]\n", box([[0, 1, 2, 3]]), "slots.gpu.gpus_per_slot = [4, 2, 2] adds up"),
    ("[slots.gpu]\ngpus_per_slot = 16\n", box(ISLANDS), "slots.gpu.gpus_per_slot = 16"),
    ("[slots.gpu]\ngpus_per_slot = 2\nshare = 2\n", box(ISLANDS), "set one of them to 1"),
    ("[slots.gpu]\nshare = 2\n", box([[0, 1]], mig={1: (10,)}), "GPU 1 (GPU-0001) is in MIG mode"),
])
def test_gpu_shapes_the_gpus_cannot_form_are_clear_errors(toml, inventory, message):
    with pytest.raises(PlanError, match=re.escape(message)) as e:
        make_plan(config(toml), inventory)
    assert "slots.gpu" in str(e.value)


@pytest.mark.parametrize("toml, message", [
    ("[slots.gpu]\nshare = 0\n", "slots.gpu.share = 0"),
    ("[slots.gpu]\ngpus_per_slot = 0\n", "slots.gpu.gpus_per_slot = 0"),
    ("[slots.gpu]\ngpus_per_slot = []\n", "slots.gpu.gpus_per_slot = []"),
])
def test_gpu_shape_keys_are_checked_with_the_config(toml, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config(toml)


def test_old_plan_files_without_gpu_memory_still_read():
    old = ('{"slots": [{"name": "slot-0", "kind": "gpu", "cpus": [1, 2], "mems": [0], "memory_bytes": 1073741824,'
           ' "shm_bytes": 268435456, "gpus": ["GPU-0000"], "gpu_indexes": [0]}], "reserved_cpus": [0],'
           ' "reserved_memory": 1073741824, "notes": []}')
    plan = Plan.from_json(old)
    assert plan.slots[0].gpu_memory_bytes == 0 and plan.slots[0].gpu_share == 1 and plan.gpu_cpus == 0
    new = make_plan(config(), box([[0, 1]]))
    assert Plan.from_json(new.to_json()) == new
