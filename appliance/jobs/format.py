"""The job commands' text: `appliance jobs` (like squeue) and `appliance history` (like sacct)."""

from __future__ import annotations

import signal
import time
from typing import Optional

from appliance.units import format_size


def age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def format_jobs(jobs: list[dict], now: Optional[float] = None) -> str:
    if not jobs:
        return "no queued, held or running jobs (appliance history shows finished ones)"
    now = now or time.time()
    rows = []
    for j in jobs:
        since = j.get("started") if j["state"] == "running" else j.get("submitted")
        rows.append([j["key"], j["state"], j.get("owner") or "-", j.get("queue") or "-", j.get("slot") or "-",
                     age(now - since if since else None), j.get("why") or ""])
    return _table(["KEY", "STATE", "OWNER", "QUEUE", "SLOT", "TIME", "WHERE / WHY"], rows)


def exit_text(code: Optional[int]) -> str:
    """An exit code as history shows it: the number, or the signal that killed it (SIGTERM)."""
    if code is None:
        return "-"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return str(code)


def format_history(jobs: list[dict]) -> str:
    if not jobs:
        return "no finished jobs"
    rows = []
    for j in jobs:
        wall = j.get("wall_seconds")
        if wall is None and j.get("started") and j.get("ended"):
            wall = j["ended"] - j["started"]
        cpu = j.get("cpu_seconds")
        code = j.get("exit_code")
        rows.append([j["key"], j["state"], j.get("class") or "-", exit_text(code),
                     age(wall) if wall is not None else "-", f"{cpu:.1f}s" if cpu is not None else "-",
                     format_size(j["peak_memory_bytes"]) if j.get("peak_memory_bytes") else "-",
                     time.strftime("%m-%d %H:%M", time.localtime(j["ended"])) if j.get("ended") else "-",
                     j.get("owner") or "-", j.get("requeued_from") or ""])
    return _table(["KEY", "STATE", "CLASS", "EXIT", "WALL", "CPU", "PEAK MEM", "ENDED", "OWNER", "REQUEUED FROM"],
                  rows)
