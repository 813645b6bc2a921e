"""Every job ends in exactly one failure class: who is to blame, and whether a retry can help.

- success: it ran and exited 0.
- user: the workload's fault: non-zero exit, an artifact the request names that is missing or
  refused, GPU memory over the slot's share (folded in here: the workload asked for more than
  its request said). Not retried.
- oom: killed for memory over its limit (the request's `ram`, else the slot's). Not retried.
- timeout: past its lifetime. Not retried.
- hung: no CPU progress and no new output for runner.hang_after. Not retried.
- environment: the request's requirement set cannot be built (a requirement no index has,
  versions that conflict, a line that is not a requirement). Not retried.
- cancelled: its owner or an admin cancelled it (`appliance cancel`). Not retried.
- infrastructure: the box's fault: store unreachable, environment build broken by something
  other than the request, runner or appliance killed or drained mid-job, GPU lost, disk full.
  The only class retried automatically (runner.retries).
"""

from __future__ import annotations

from typing import Optional

from appliance.units import format_size as _size

SUCCESS, USER, OOM, TIMEOUT, HUNG = "success", "user", "oom", "timeout", "hung"
ENVIRONMENT, INFRASTRUCTURE, CANCELLED = "environment", "infrastructure", "cancelled"
CLASSES = (SUCCESS, USER, OOM, TIMEOUT, HUNG, ENVIRONMENT, INFRASTRUCTURE, CANCELLED)

_BY_OUTCOME = {
    "success": SUCCESS,
    "out of memory": OOM,
    "timed out": TIMEOUT,
    "hung": HUNG,
    "cancelled": CANCELLED,
    "GPU memory over the slot's share": USER,
    "interrupted": INFRASTRUCTURE,
    "released": INFRASTRUCTURE,
}

# ENV_FAILED reasons that name something in the request itself: pyenv.BadRequirement, or a set
# that cannot be resolved, in pip's words (no version matches, versions that conflict) or uv's
# (its resolver's "No solution found": a package not in the registry or the find-links folders,
# requirements that are unsatisfiable). Any other environment failure is the box's.
_REQUEST_ENV = ("no matching distribution", "could not find a version", "no solution found",
                "because there is no version", "not a valid requirement", "invalid requirement",
                "bad requirement", "only requirement specifiers", "unsupported python", "requires a different python",
                "resolutionimpossible", "conflicting dependencies", "the conflict is caused by",
                "not found in the package registry", "not found in the provided package locations",
                "requirements are unsatisfiable")

# Network trouble reaching an index or the store: the box's, even when pip then says it found
# no matching version (it says that when the index did not answer too).
_NETWORK = ("connection refused", "newconnectionerror", "max retries exceeded", "temporary failure in name",
            "name or service not known", "network is unreachable", "connection reset", "read timed out",
            "connecttimeout", "failed to fetch", "error sending request", "dns error", "tcp connect error")

# FAILED without an exit code: the runner stopped it before or after the workload.
_BOX_FAILED = ("store unavailable", "no space left", "the disk is full", "runner error", "gpu lost",
               "gpu error", "unknown error")


def classify(outcome: str, exit_code: Optional[int] = None, reason: str = "") -> str:
    """The failure class of a job that ended with `outcome` (execute.*), `exit_code`, `reason`."""
    if outcome in _BY_OUTCOME:
        return _BY_OUTCOME[outcome]
    why = (reason or "").lower()
    if outcome == "environment failed":
        if any(s in why for s in _NETWORK):
            return INFRASTRUCTURE
        return ENVIRONMENT if any(s in why for s in _REQUEST_ENV) else INFRASTRUCTURE
    if outcome == "failed":
        if any(s in why for s in _BOX_FAILED):
            return INFRASTRUCTURE
        return USER
    return INFRASTRUCTURE  # an outcome this table does not know: never blame the user for it


def retried(cls: str) -> bool:
    """Whether a job ending in `cls` is put back to run again (up to runner.retries)."""
    return cls == INFRASTRUCTURE


def report_line(report: dict) -> str:
    """One line for the per-job report (the footer of `appliance logs`, `appliance results`)."""
    parts = [f"class {report.get('class', '?')}"]
    if report.get("cpu_seconds") is not None:
        parts.append(f"cpu {report['cpu_seconds']:.1f}s")
    if report.get("wall_seconds") is not None:
        parts.append(f"wall {report['wall_seconds']:.1f}s")
    if report.get("peak_memory_bytes") is not None:
        parts.append(f"peak memory {_size(report['peak_memory_bytes'])}")
    if report.get("gpu_peak_memory_bytes") is not None:
        parts.append(f"peak GPU memory {_size(report['gpu_peak_memory_bytes'])}")
    where = f"slot {report.get('slot', '?')}"
    if report.get("cpus"):
        where += f" cpus {report['cpus']}"
    if report.get("gpus"):
        where += f" gpus {report['gpus']}"
    return ", ".join(parts + [where])
