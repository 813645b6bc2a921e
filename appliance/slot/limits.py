"""CPU lists in the Linux list format ("0-3,8,10-11"), as used by cpuset.cpus and taskset, and
a slot's bound on processes.

Imported by the exec wrapper and by the planner, so it stays free of heavy imports.
"""

from __future__ import annotations


def parse_cpu_list(text: str) -> list[int]:
    """Parse "0-3,8,10-11" into a sorted list without duplicates.

    An empty string (or only whitespace) is the empty list, as the kernel writes it.
    Raises ValueError naming the bad part.
    """
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return []
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if not _is_number(lo) or (dash and not _is_number(hi)):
            raise ValueError(
                f"bad CPU list {text!r}: {part!r} is not a number or a range like 0-3"
            )
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first:
            raise ValueError(f"bad CPU list {text!r}: range {part!r} goes backwards")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def format_cpu_list(cpus: list[int]) -> str:
    """Write CPUs as "0-3,8,10-11": consecutive runs become ranges; order and duplicates don't matter."""
    parts = []
    run: list[int] = []
    for cpu in sorted(set(cpus)):
        if cpu < 0:
            raise ValueError(f"bad CPU number {cpu}: CPU numbers start at 0")
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            parts.append(_run_text(run))
        run = [cpu]
    if run:
        parts.append(_run_text(run))
    return ",".join(parts)


def _run_text(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def _is_number(text: str) -> bool:
    # str.isdigit() also accepts digits like "²"; the kernel only takes ASCII.
    return bool(text) and text.isascii() and text.isdigit()


AUTO_PIDS_LIMIT = 4096
PID_MAX_FILE = "/proc/sys/kernel/pid_max"


def pids_limit(configured, pid_max: int) -> int:
    """The processes and threads one job may have: `configured` (isolation.pids_limit), or for
    "auto" 4096, at most an eighth of the host's pid_max (and at least 64)."""
    if configured != "auto":
        return int(configured)
    return max(64, min(AUTO_PIDS_LIMIT, pid_max // 8))


def host_pid_max(path: str = PID_MAX_FILE) -> int:
    """The kernel's pid_max (32768 when unreadable: the smallest usual value)."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 32768
