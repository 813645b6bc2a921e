"""appliance top: a live view of the slots (CPU, memory, GPU, job, its last output line), the
queues and the store, refreshed every second. `status --watch` shows `status` the same way.

Plain curses (no mouse, no colours needed), so it works over ssh. `q` or Ctrl-C quits; a resize
redraws. Without a terminal (a pipe, TERM=dumb) it prints one frame and exits, like `status`.
The facts come from appliance/status.py's gather(), sampled in a background thread so the keys
stay responsive while the store or supervisord are slow to answer.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from typing import Callable, Optional

from appliance.api.status_client import status_facts
from appliance.status import format_status, queue_row_text
from appliance.units import format_size

REFRESH_S = 1.0
TAIL_BYTES = 4096  # the last output line is looked for in this much of the file's end


def register(sub):
    p = sub.add_parser("top", help="live view of the slots, their jobs, the queues and the store (q quits)")
    p.set_defaults(func=run)


def run(args) -> int:
    sampler = Sampler(args.home)
    return live(sampler.sample, render_top, first=sampler.warm_up)


# ------------------------------------------------------------------ sampling


def last_line(path: Optional[str]) -> str:
    """The last non-empty line of a (growing) text file, reading only its end; '' if none."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read(TAIL_BYTES)
    except OSError:
        return ""
    for line in reversed(tail.decode(errors="replace").split("\n")):
        line = line.rsplit("\r", 1)[-1]  # a progress bar redraws itself with \r
        line = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x1f\x7f]", "", line).strip()
        if line:
            return line
    return ""


class Sampler:
    """gather() (which has the queues' depth) plus what only a live view needs: CPU use
    between two samples, GPU use and each job's last output line."""

    def __init__(self, home):
        self.home = home
        self.cpu_seen: dict[str, tuple[float, int]] = {}  # slot -> (monotonic time, cpu ns)

    def warm_up(self) -> None:
        """A first CPU reading, so even a single frame shows CPU use."""
        self.sample()
        time.sleep(0.5)

    def sample(self) -> dict:
        facts = status_facts(self.home)  # through the API: members see their own jobs
        for s in facts["slots"]:
            s["cpu_used"] = self._cpu(s)
            s["last_line"] = last_line(s.get("output")) if s.get("experiment") else ""
        facts["gpu_usage"] = self._gpus(facts)
        facts["sampled"] = time.time()
        return facts

    def _cpu(self, slot: dict) -> Optional[float]:
        """CPUs busy on average since the last sample (1.0 = one CPU all the time), or None."""
        if slot["state"] != "RUNNING" or slot.get("container_id"):
            self.cpu_seen.pop(slot["name"], None)
            return None
        from appliance.slot.cgroup import cpu_seconds

        used, now = cpu_seconds(slot["name"]), time.monotonic()
        before = self.cpu_seen.get(slot["name"])
        if used is None:
            return None
        self.cpu_seen[slot["name"]] = (now, used)
        if before is None or now <= before[0]:
            return None
        return max(0.0, (used - before[1]) / (now - before[0]))

    def _gpus(self, facts: dict) -> dict:
        indexes = sorted({i for s in facts["slots"] for i in s["gpu_indexes"]})
        if not indexes:
            return {}
        from appliance.gpus import gpu_usage

        return {u.index: u.__dict__ for u in gpu_usage(indexes)}


# ------------------------------------------------------------------ rendering


def _elapsed(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _gpu_text(slot: dict, usage: dict) -> str:
    parts = []
    for i in slot["gpu_indexes"]:
        u = usage.get(i) or {}
        if u.get("problem"):
            parts.append(f"{i}: ?")
            continue
        busy = f"{u['utilization']}%" if u.get("utilization") is not None else "?%"
        mem = (f" {format_size(u['memory_used_bytes'])}/{format_size(u['memory_total_bytes'])}"
               if u.get("memory_total_bytes") else "")
        parts.append(f"{i}: {busy}{mem}")
    return "; ".join(parts) or "-"


def render_top(facts: dict, width: int) -> list[str]:
    """The frame as text lines, each at most `width` long (the first line is the title)."""
    state = f"running (supervisord {facts['supervisord_pid']})" if facts["running"] else "NOT running"
    lines = [f"appliance top  {facts['home']}  {state}  "
             f"{time.strftime('%H:%M:%S', time.localtime(facts.get('sampled', time.time())))}   q quits"]
    if facts["config_problem"]:
        lines.append(f"config problem: {facts['config_problem']}")
    lines.append("")
    gpu_col = any(s["gpu_indexes"] for s in facts["slots"])  # no GPU slot: no GPU column
    gpu_head = f"{'GPU (busy mem)':<20} " if gpu_col else ""
    lines.append(f"{'SLOT':<8} {'STATE':<10} {'CPU':<9} {'MEMORY':<19} {gpu_head}JOB")
    now = time.time()
    for s in facts["slots"]:
        cpus = len(s["cpus"])
        cpu = f"{s['cpu_used']:.2f}/{cpus}" if s.get("cpu_used") is not None else f"-/{cpus}"
        used = s["memory_used_bytes"]
        memory = f"{format_size(used) if used is not None else '-'}/{format_size(s['memory_bytes'])}"
        state = (s["runner_state"] or "?") if s["state"] == "RUNNING" else s["state"].lower()
        if s["experiment"]:
            started = s.get("job_started")
            job = (f"{s['experiment']}  {_elapsed(now - started if started else None)}"
                   f"  queue {s['queue'] or '-'}")
        elif s["last_result"]:
            r = s["last_result"]
            job = f"idle; last: {r.get('experiment')} {r.get('outcome')}"
        else:
            job = "idle"
        gpu = f"{_gpu_text(s, facts.get('gpu_usage') or {}):<20} " if gpu_col else ""
        lines.append(f"{s['name']:<8} {state:<10} {cpu:<9} {memory:<19} {gpu}{job}")
        if s["experiment"]:
            lines.append(f"{'':<8} > {s.get('last_line') or '(no output yet)'}")
    if not facts["slots"]:
        lines.append("(no slots: run `appliance up`)")

    lines += ["", "QUEUES"]
    rows = facts.get("queue_rows") or []
    for r in rows:
        lines.append(f"  {queue_row_text(r)}")
    for src in (facts.get("sources") or {}).get("sources", []):
        if src.get("name") == "local" or (src.get("state") == "ok" and
                                          any(r["source"] == src.get("name") for r in rows)):
            continue  # its queues are listed above
        state = "ok" if src.get("state") == "ok" else f"BROKEN: {src.get('reason')}"
        lines.append(f"  {src['name']}: {state}; queues {', '.join(src.get('queues') or []) or '-'}")
    if facts.get("queue_problem"):
        lines.append(f"  {facts['queue_problem']}")
    elif len(lines) and lines[-1] == "QUEUES":
        lines.append("  (no queue yet)")

    store = facts["store"]
    lines.append("")
    lines.append(f"STORE   {store['kind']} {store.get('endpoint', '')} bucket {store.get('bucket', '-')}: "
                 + ("healthy" if store["healthy"] else f"NOT healthy: {store['problem']}"))
    gpus = facts["gpus"]
    bad = [g for g in gpus["devices"] if not g["healthy"]]
    lines.append(f"GPUS    {len(gpus['devices'])}" + (f", unhealthy: {', '.join(str(g['index']) for g in bad)}"
                                                       if bad else "") if gpus["devices"] else
                 f"GPUS    none ({gpus['problem'] or 'NVML lists no GPU'})")
    return [line[:width] for line in lines]


def render_status(facts: dict, width: int) -> list[str]:
    title = f"appliance status --watch   {time.strftime('%H:%M:%S')}   q quits"
    return [line[:width] for line in [title, *format_status(facts).splitlines()]]


# ------------------------------------------------------------------ the terminal


def interactive() -> bool:
    """A terminal curses can draw on: stdin and stdout are TTYs and TERM can address the cursor."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return False
    import curses

    for name in ("LINES", "COLUMNS"):  # curses would take a stale size from these over the terminal's
        os.environ.pop(name, None)
    try:
        curses.setupterm()
        return bool(curses.tigetstr("cup"))
    except curses.error:
        return False


def live(sample: Callable[[], dict], render: Callable[[dict, int], list[str]],
         first: Optional[Callable[[], None]] = None) -> int:
    """Show render(sample()) refreshed every second until q or Ctrl-C; one frame without a TTY."""
    if not interactive():
        if first:
            first()
        width = shutil.get_terminal_size((120, 40)).columns
        print("\n".join(render(sample(), width)))
        return 0
    import curses

    latest: dict = {"facts": None, "error": ""}
    stop = threading.Event()

    def sampling() -> None:
        while not stop.is_set():
            try:
                latest["facts"], latest["error"] = sample(), ""
            except Exception as e:  # noqa: BLE001 - shown on screen; the view goes on
                latest["error"] = f"{type(e).__name__}: {e}"
            stop.wait(REFRESH_S)

    thread = threading.Thread(target=sampling, name="top-sampler", daemon=True)
    thread.start()
    try:
        curses.wrapper(_screen, latest, render)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
    return 0


def _screen(stdscr, latest: dict, render) -> None:
    import curses

    try:
        curses.curs_set(0)
    except curses.error:
        pass  # a terminal that cannot hide the cursor
    stdscr.timeout(int(REFRESH_S * 1000 / 4))
    shown = None
    while True:
        key = stdscr.getch()
        if key in (ord("q"), ord("Q")):
            return
        facts = latest["facts"]
        if key == curses.KEY_RESIZE:
            stdscr.clear()  # repaint every cell: what the terminal kept is not what curses thinks
        if key == curses.KEY_RESIZE or (facts is not None and facts is not shown) or latest["error"]:
            shown = facts
            _paint(stdscr, facts, latest["error"], render)


def _paint(stdscr, facts, error: str, render) -> None:
    import curses

    height, width = stdscr.getmaxyx()
    stdscr.erase()
    if facts is None:
        lines = ["appliance top: gathering..."]
    else:
        lines = render(facts, max(1, width - 1))
    if error:
        lines = lines + [f"(last refresh failed: {error})"]
    if height < 3 or width < 20:
        lines = ["terminal too small"]
    for row, line in enumerate(lines[:height]):
        attr = curses.A_REVERSE if row == 0 else (curses.A_BOLD if line.startswith(("SLOT ", "QUEUES")) else 0)
        try:
            stdscr.addnstr(row, 0, line, max(1, width - 1), attr)
        except curses.error:
            pass  # the bottom-right cell
    stdscr.refresh()
