"""What submit refuses at once: a request no slot of this box can run, a bad requirement."""

from __future__ import annotations

import pytest

from appliance.runner.triage import SlotShape
from appliance.studioml.request import Resources
from appliance.submit_checks import bad_requirements, unrunnable

GiB = 2**30
CPU = SlotShape("slot-0", cpus=2, memory_bytes=4 * GiB, gpus=0)
GPU = SlotShape("slot-1", cpus=4, memory_bytes=16 * GiB, gpus=1, gpu_mem_bytes=24 * GiB)


def want(cpus=1, gpus=0, ram=0, hdd=0, gpu_mem=0) -> Resources:
    return Resources(cpus=cpus, gpus=gpus, ram_bytes=ram, hdd_bytes=hdd, gpu_mem_bytes=gpu_mem)


@pytest.mark.parametrize("resources, shapes, disk, expected", [
    (want(ram=GiB), [CPU], None, None),
    (want(ram=64 * GiB), [], None, None),                         # no plan yet: nothing to judge by
    (want(ram=8 * GiB), [CPU], None, "slot-0 needs 8 GiB ram, slot has 4 GiB"),
    (want(ram=8 * GiB), [CPU, GPU], None, None),                   # the GPU slot has room
    (want(ram=32 * GiB), [CPU, GPU], None, "slot-1 needs 32 GiB ram, slot has 16 GiB, and 1 more"),
    (want(gpus=1), [CPU], None, "needs 1 gpus, slot has 0"),
    (want(gpus=1, gpu_mem=40 * GiB), [GPU], None, "per gpu"),
    (want(cpus=3), [CPU], None, "needs 3 cpus, slot has 2"),
    (want(hdd=10 * GiB), [CPU], 5 * GiB, "disk"),
    (want(hdd=10 * GiB), [CPU], None, None),                      # disk unknown: not judged
])
def test_unrunnable(resources, shapes, disk, expected):
    got = unrunnable(resources, shapes, disk)
    if expected is None:
        assert got is None
    else:
        assert got is not None and expected in got and "ask for less" in got


@pytest.mark.parametrize("lines, expected", [
    (["numpy==1.26.4", "torch>=2; sys_platform == 'linux'"], None),
    ([], None),
    (["numpy==="], "requirements.txt: requirement 'numpy===' is not a requirement specifier"),
    (["x @ https://e.com/x.whl"], "direct reference"),
    (["--index-url=https://evil"], "pip option"),
])
def test_bad_requirements(lines, expected):
    got = bad_requirements(lines, "requirements.txt")
    assert (got is None) if expected is None else (expected in got)
