"""Job control's rules (appliance/jobs/policy.py), as tables."""

import pytest

from appliance.jobs import policy
from appliance.jobs.policy import SlotView, Waiting

WAIT_CODES = [
    ("done", "success", 0, 0),
    ("failed", "user", 3, 3),
    ("failed", "user", 1, 1),
    ("failed", "user", -9, 137),        # killed by SIGKILL
    ("failed", "user", -15, 143),
    ("failed", "user", None, 125),      # an artifact missing: it never ran
    ("failed", "environment", None, 125),
    ("failed", "infrastructure", None, 125),
    ("failed", "oom", None, 137),
    ("failed", "oom", -9, 137),
    ("failed", "timeout", None, 124),
    ("failed", "hung", None, 124),
    ("cancelled", "cancelled", None, 143),
    ("cancelled", "cancelled", -15, 143),
    ("failed", "user", 0, 125),         # exited 0 but its outputs never reached the store
    ("failed", "user", 256, 125),
    ("running", None, None, None),
    ("queued", None, None, None),
    ("held", None, None, None),
]


@pytest.mark.parametrize("state,cls,code,expected", WAIT_CODES)
def test_wait_exit_code_of_each_ending(state, cls, code, expected):
    assert policy.wait_code(state, cls, code) == expected


@pytest.mark.parametrize("codes,expected", [
    ([0, 0, 0], 0), ([0, 3, 1], 3), ([143, 0], 143), ([0, None], None), ([], 0)])
def test_array_code_is_its_first_failure(codes, expected):
    assert policy.array_code(codes) == expected


ARRAYS = [
    ("0-4", [0, 1, 2, 3, 4], None),
    ("0-99%4", list(range(100)), 4),
    ("7", [7], None),
    ("1,3,5-6", [1, 3, 5, 6], None),
    ("0-20:5", [0, 5, 10, 15, 20], None),
    (" 2-3%1 ", [2, 3], 1),
]


@pytest.mark.parametrize("spec,indices,limit", ARRAYS)
def test_array_specs(spec, indices, limit):
    assert policy.parse_array(spec) == (indices, limit)


@pytest.mark.parametrize("spec", ["", "a-b", "5-2", "0-9%0", "0-9%x", "1,1", "-3", "0-99999", "0-4:0"])
def test_bad_array_specs_say_the_form(spec):
    with pytest.raises(policy.SpecError, match="--array"):
        policy.parse_array(spec)


def test_sweep_is_the_cross_product_last_name_fastest():
    assert policy.parse_sweeps(["lr=0.1,0.01", "depth=2,4"]) == [
        {"lr": "0.1", "depth": "2"}, {"lr": "0.1", "depth": "4"},
        {"lr": "0.01", "depth": "2"}, {"lr": "0.01", "depth": "4"}]
    assert policy.parse_sweeps(["seed=1"]) == [{"seed": "1"}]
    assert policy.parse_sweeps([]) == []


@pytest.mark.parametrize("specs", [["lr"], ["1x=2"], ["lr=0.1,,0.2"], ["lr=1", "lr=2"], ["a b=1"]])
def test_bad_sweeps_say_the_form(specs):
    with pytest.raises(policy.SpecError, match="--sweep"):
        policy.parse_sweeps(specs)


def test_array_plans():
    assert policy.array_plan(None, []) is None
    assert policy.array_plan("0-2%2", []) == ([(0, {}), (1, {}), (2, {})], 2)
    assert policy.array_plan(None, ["lr=1,2"]) == ([(0, {"lr": "1"}), (1, {"lr": "2"})], None)
    assert policy.array_plan("%1", ["lr=1,2"]) == ([(0, {"lr": "1"}), (1, {"lr": "2"})], 1)
    assert policy.array_plan("1", ["lr=1,2"]) == ([(1, {"lr": "2"})], None)
    with pytest.raises(policy.SpecError, match="2 combinations"):
        policy.array_plan("0-5", ["lr=1,2"])


def test_member_keys():
    assert policy.member_key("1700_abc", 3) == "1700_abc-3"


def _w(key, owner, t):
    return Waiting(key, owner, t)


FAIR = [
    # one owner: FIFO
    ([_w("a1", 1, 1), _w("a2", 1, 2), _w("a3", 1, 3)], {}, ["a1", "a2", "a3"]),
    # a member's one job is not stuck behind another's many: it goes second
    ([_w(f"a{i}", 1, i) for i in range(5)] + [_w("b0", 2, 100)], {}, ["a0", "b0", "a1", "a2", "a3", "a4"]),
    # ... and first when the other member started a job more recently
    ([_w(f"a{i}", 1, i) for i in range(3)] + [_w("b0", 2, 100)], {1: 50.0, 2: 10.0}, ["b0", "a0", "a1", "a2"]),
    # owners who never started go before those who did; then they alternate
    ([_w("a0", 1, 1), _w("a1", 1, 2), _w("b0", 2, 3), _w("b1", 2, 4), _w("c0", 3, 5)], {1: 9.0},
     ["b0", "c0", "a0", "b1", "a1"]),
    ([], {}, []),
]


@pytest.mark.parametrize("waiting,last,expected", FAIR)
def test_fair_share_order(waiting, last, expected):
    assert policy.fair_order(waiting, last) == expected


@pytest.mark.parametrize("n,text", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"),
                                    (12, "12th"), (13, "13th"), (21, "21st"), (102, "102nd"), (111, "111th")])
def test_ordinals(n, text):
    assert policy.ordinal(n) == text


BUSY = [SlotView("slot-0", 0, "x"), SlotView("slot-1", 0, "y")]
WHY = [
    (dict(state="held", position=None, gpus=0, slots=BUSY), "held (appliance release K)"),
    (dict(state="queued", position=2, gpus=0, slots=BUSY), "2nd in local_appliance; slot-0 busy, slot-1 busy"),
    (dict(state="queued", position=1, gpus=0, slots=[SlotView("slot-0"), SlotView("slot-1", 0, "y")]),
     "1st in local_appliance; a slot is free: starts next"),
    (dict(state="queued", position=2, gpus=2, slots=[SlotView("slot-0", 1)]), "needs 2 GPUs, this box has 1"),
    (dict(state="queued", position=2, gpus=2, slots=[SlotView("slot-0", 1), SlotView("slot-1", 1)]),
     "needs 2 GPUs, this box has 2 (at most 1 in one slot)"),
    (dict(state="queued", position=3, gpus=0, slots=BUSY, array_running=4, array_limit=4, array_base="B"),
     "array B: 4 of at most 4 running"),
    (dict(state="queued", position=1, gpus=0, slots=[]), "1st in local_appliance; no slot is up (appliance up)"),
    (dict(state="queued", position=1, gpus=1, slots=[SlotView("slot-0", 0), SlotView("g0", 1, "z")]),
     "1st in local_appliance; g0 busy"),
]


@pytest.mark.parametrize("kw,line", WHY)
def test_why_a_job_waits(kw, line):
    assert policy.why_waiting(key="K", queue="local_appliance", **kw) == line


@pytest.mark.parametrize("code,text", [(None, "-"), (0, "0"), (3, "3"), (-15, "SIGTERM"), (-9, "SIGKILL"), (-99, "signal 99")])
def test_history_shows_a_signal_by_name(code, text):
    from appliance.jobs.format import exit_text

    assert exit_text(code) == text
