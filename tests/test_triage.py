"""What a slot may run (appliance/runner/triage.py): the verdict for each request and shape, as a table."""

from __future__ import annotations

import pytest

from appliance.runner.triage import ELSEWHERE, LATER, NOWHERE, RUN, SlotShape, expired, fit
from appliance.studioml.request import Request, Resources

GiB = 1024**3


def request(cpus=1, gpus=0, ram_gib=0, hdd_gib=0, lifetime_s=None, time_added=None) -> Request:
    return Request(key="k", filename="main.py", args=(), pythonenv=(), pythonver=None,
                   resources=Resources(cpus=cpus, gpus=gpus, ram_bytes=ram_gib * GiB, hdd_bytes=hdd_gib * GiB,
                                       gpu_mem_bytes=0),
                   max_duration_s=None, lifetime_s=lifetime_s, time_added=time_added, save_every_s=None,
                   env={}, pip=(), artifacts={}, raw={})


CPU = SlotShape("cpu-0", cpus=4, memory_bytes=16 * GiB, gpus=0)
GPU = SlotShape("gpu-0", cpus=4, memory_bytes=16 * GiB, gpus=1)
BIG = SlotShape("cpu-1", cpus=32, memory_bytes=256 * GiB, gpus=0)


@pytest.mark.parametrize("req, me, others, total, free, verdict, why", [
    (request(), CPU, [], 100, 100, RUN, None),
    (request(hdd_gib=10), CPU, [], 100 * GiB, 5 * GiB, LATER, None),  # the disk may free up
    (request(gpus=1), CPU, [GPU], 100, 100, ELSEWHERE, None),
    (request(cpus=16), CPU, [GPU, BIG], 100, 100, ELSEWHERE, None),
    (request(gpus=1), CPU, [BIG], 100, 100, NOWHERE, "gpu"),
    (request(ram_gib=512), CPU, [BIG, GPU], 100, 100, NOWHERE, "ram"),
    (request(hdd_gib=10), CPU, [BIG], 5 * GiB, 5 * GiB, NOWHERE, "disk"),  # no slot's disk is big enough
])
def test_fit(req, me, others, total, free, verdict, why):
    got, reason = fit(req, me, others, total, free)
    assert got == verdict
    if why is None:
        assert reason is None
    else:
        assert why in reason


@pytest.mark.parametrize("req, now, gone", [
    (request(), 10**9, False),  # no lifetime asked: the default holds only once it runs
    (request(lifetime_s=60, time_added=1000.0), 1059.0, False),
    (request(lifetime_s=60, time_added=1000.0), 1061.0, True),
    (request(lifetime_s=60), 10**9, False),  # no time_added: nothing to count from
])
def test_expired(req, now, gone):
    why = expired(req, 86400.0, now)
    assert bool(why) == gone
    if gone:
        assert "experimentLifetime of 60s" in why
