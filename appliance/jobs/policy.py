"""Job control's rules as pure functions (table-tested in tests/test_jobs_policy.py).

- `wait_code`: what `appliance wait` exits with for a finished job.
- `parse_array`, `parse_sweeps`: `submit --array 0-99%4` and `--sweep lr=0.1,0.01` into indices
  and environments.
- `fair_order`: the order waiting jobs start in (fair share by owner).
- `why_waiting`: one line saying where a waiting job stands and why.

## `wait` exit codes (the shell's and timeout(1)'s conventions)

    0        the job succeeded (for an array: every member did)
    1-255    a failed job's own exit code (a job killed by signal N: 128 + N)
    124      timed out (past its lifetime or max duration), or stopped as hung
    125      never ran: dead-lettered (bad request, artifacts missing, the environment could not
             be built, the box failed it for good), or failed without an exit code
    137      killed for memory (oom: 128 + SIGKILL, what a shell shows for an OOM-killed process)
    143      cancelled (128 + SIGTERM, what `cancel` sends)
A job's own exit code may be one of these too; `history` says which it was.
An array's code is that of its first member (by index) that did not succeed; 0 if all did.

## Queue order (fair share)

Within one queue, jobs start in this order:
1. held jobs, and array members over their array's `%N` bound, wait and are passed over;
2. among the owners with waiting jobs, the owner whose latest job started longest ago goes next
   (an owner who never started one first; ties: whose oldest waiting job came first);
3. an owner's own jobs go in the order they were submitted.
So one member's single job waits for at most one job of each other member, never behind
another member's thousand. Slots serve queues in turn (docs/queues.md); the order holds within
each queue.
"""

from __future__ import annotations

import heapq
import itertools
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

OK, TIMEOUT_CODE, UNRUNNABLE_CODE, OOM_CODE, CANCELLED_CODE = 0, 124, 125, 137, 143
MAX_ARRAY = 10000  # the most jobs one submit makes


def wait_code(state: str, cls: Optional[str], exit_code: Optional[int]) -> Optional[int]:
    """`wait`'s exit code for a job in `state` (None while it has not finished)."""
    if state == "done":
        return OK
    if state == "cancelled" or cls == "cancelled":
        return CANCELLED_CODE
    if state != "failed":
        return None
    if cls == "oom":
        return OOM_CODE
    if cls in ("timeout", "hung"):
        return TIMEOUT_CODE
    if exit_code is None:
        return UNRUNNABLE_CODE
    if exit_code < 0:  # killed by signal -exit_code
        return 128 + (-exit_code & 0x7F)
    if exit_code == 0:  # failed after a clean exit (its outputs could not be uploaded)
        return UNRUNNABLE_CODE
    return exit_code & 0xFF or UNRUNNABLE_CODE


def array_code(codes: Sequence[Optional[int]]) -> Optional[int]:
    """The code of an array from its members' codes in index order; None while any runs."""
    if any(c is None for c in codes):
        return None
    return next((c for c in codes if c != OK), OK)


class SpecError(ValueError):
    """A bad --array or --sweep; the message says what is wrong and shows the form."""


_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")


def parse_array(spec: str) -> tuple[list[int], Optional[int]]:
    """`0-99%4` -> ([0..99], 4); also `1,3,8-10`, `0-20:5` (a step). The limit is None without %."""
    text = spec.strip()
    limit = None
    if "%" in text:
        text, _, lim = text.partition("%")
        if not lim.isdigit() or int(lim) < 1:
            raise SpecError(f"--array {spec!r}: after % give how many may run at once, e.g. 0-99%4")
        limit = int(lim)
    indices: list[int] = []
    for part in text.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise SpecError(f"--array {spec!r}: write indices as 0-99, 1,3,5, 0-20:5 or 0-99%4")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        step = int(m.group(3)) if m.group(3) is not None else 1
        if hi < lo or step < 1:
            raise SpecError(f"--array {spec!r}: {part.strip()} is an empty range (write low-high)")
        if (hi - lo) // step + 1 + len(indices) > MAX_ARRAY:
            raise SpecError(f"--array {spec!r}: at most {MAX_ARRAY} jobs per submit")
        indices.extend(range(lo, hi + 1, step))
    if len(set(indices)) != len(indices):
        raise SpecError(f"--array {spec!r}: an index appears twice")
    return indices, limit


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_sweeps(specs: Iterable[str]) -> list[dict[str, str]]:
    """`["lr=0.1,0.01", "depth=2,4"]` -> the cross product, one environment per job, in order
    (the last name varies fastest): [{lr: 0.1, depth: 2}, {lr: 0.1, depth: 4}, ...]."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not _NAME.match(name):
            raise SpecError(f"--sweep {spec!r}: write NAME=V1,V2,... with NAME a variable name (e.g. lr=0.1,0.01)")
        if any(n == name for n, _ in axes):
            raise SpecError(f"--sweep {spec!r}: {name} is swept twice; give its values in one --sweep")
        vals = [v.strip() for v in values.split(",")]
        if not all(vals):
            raise SpecError(f"--sweep {spec!r}: an empty value (write NAME=V1,V2,...)")
        axes.append((name, vals))
    if not axes:
        return []
    total = 1
    for _, vals in axes:
        total *= len(vals)
    if total > MAX_ARRAY:
        raise SpecError(f"--sweep: {total} combinations; at most {MAX_ARRAY} jobs per submit")
    names = [n for n, _ in axes]
    return [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in axes))]


def array_plan(array: Optional[str], sweeps: Sequence[str]) -> Optional[tuple[list, Optional[int]]]:
    """`submit --array SPEC` and/or `--sweep ...` -> ([(index, extra environment)], %N bound), or
    None for a plain submit. With both, --array gives only the bound (`%4`) or the indices to
    take from the sweep's combinations."""
    combos = parse_sweeps(sweeps)
    if array is None:
        return ([(i, c) for i, c in enumerate(combos)], None) if combos else None
    if array.strip().startswith("%") and combos:
        _, limit = parse_array("0" + array.strip())
        return [(i, c) for i, c in enumerate(combos)], limit
    indices, limit = parse_array(array)
    if not combos:
        return [(i, {}) for i in indices], limit
    if max(indices) >= len(combos):
        raise SpecError(f"--array {array!r}: the sweep has {len(combos)} combinations (indices 0-{len(combos) - 1})")
    return [(i, combos[i]) for i in indices], limit


def member_key(base: str, index: int) -> str:
    return f"{base}-{index}"


@dataclass(frozen=True)
class Waiting:
    """What fair_order needs of a waiting job."""
    key: str
    owner_uid: Optional[int]
    submitted: float


def fair_order(waiting: Sequence[Waiting], last_started: dict) -> list[str]:
    """The keys of `waiting` (one queue's runnable jobs) in the order they start (module doc).
    `last_started`: owner uid -> when their latest job started (absent: never)."""
    by_owner: dict = {}
    for job in sorted(waiting, key=lambda j: (j.submitted, j.key)):
        by_owner.setdefault(job.owner_uid, []).append(job)
    heap = []
    for owner, jobs in by_owner.items():
        heap.append((last_started.get(owner, float("-inf")), jobs[0].submitted, str(owner), owner))
    heapq.heapify(heap)
    order, turn, pos = [], 0, {owner: 0 for owner in by_owner}
    while heap:
        _, _, tie, owner = heapq.heappop(heap)
        jobs = by_owner[owner]
        order.append(jobs[pos[owner]].key)
        pos[owner] += 1
        turn += 1
        if pos[owner] < len(jobs):  # it starts now: its owner goes to the back of the line
            heapq.heappush(heap, (float("inf"), turn, tie, owner))
    return order


def ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass(frozen=True)
class SlotView:
    """A slot as why_waiting sees it: its name, its GPUs, the job it runs (None: idle)."""
    name: str
    gpus: int = 0
    running: Optional[str] = None


def why_waiting(*, key: str, state: str, queue: str, position: Optional[int], gpus: int,
                slots: Sequence[SlotView], array_running: int = 0, array_limit: Optional[int] = None,
                array_base: Optional[str] = None) -> str:
    """Where a queued or held job stands and why it waits, in one line."""
    if state == "held":
        return f"held (appliance release {key})"
    if slots and gpus > max(s.gpus for s in slots):
        most = max(s.gpus for s in slots)
        box = sum(s.gpus for s in slots)
        return (f"needs {gpus} GPU{'s' if gpus != 1 else ''}, this box has {box}"
                + (f" (at most {most} in one slot)" if box > most else ""))
    if array_limit is not None and array_running >= array_limit:
        return f"array {array_base}: {array_running} of at most {array_limit} running"
    where = f"{ordinal(position)} in {queue}" if position else f"in {queue}"
    fit = [s for s in slots if s.gpus >= gpus]
    busy = [s for s in fit if s.running]
    if not slots:
        return f"{where}; no slot is up (appliance up)"
    if len(busy) < len(fit):
        return f"{where}; a slot is free: starts next" if position == 1 else f"{where}"
    shown = ", ".join(f"{s.name} busy" for s in busy[:3]) + (", ..." if len(busy) > 3 else "")
    return f"{where}; {shown}"
