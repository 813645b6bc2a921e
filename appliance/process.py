"""A child process of ours: what it inherits of our environment, and how it is watched.

`base_env` is the part of the runner's environment a child may see (a workload, an
environment build). `supervise` waits for a child that leads its own process group under a
`Supervision`: keepalives every tick, a deadline (TIMED_OUT), a drain (INTERRUPTED), no
progress for too long (HUNG), a check that stops it at once (OVER_GPU_SHARE); SIGTERM to the
group first, SIGKILL after a grace period. While it waits it keeps the child's high-water mark
(VmHWM) as `proc.hwm`. Below the runner and the environment builder
(`appliance/pyenv/`), which both use it; it imports neither.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

TIMED_OUT = "timed out"
INTERRUPTED = "interrupted"  # drained: stopped before it finished, will run again
OVER_GPU_SHARE = "GPU memory over the slot's share"  # stopped by the runner's NVML watch
HUNG = "hung"  # no CPU progress and no new output for runner.hang_after
CANCELLED = "cancelled"  # its owner or an admin cancelled it (`appliance cancel`): SIGTERM, then SIGKILL

# What a workload inherits from the runner. Everything else (AWS_* and APPLIANCE_* secrets of
# the appliance, PYTHONPATH pointing into the appliance, ...) stays out.
KEEP_NAMES = {
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR",
    "LD_LIBRARY_PATH", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
    "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CUDA_VISIBLE_DEVICES",
}
KEEP_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "PIP_", "UV_")


def base_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of the runner's environment a workload may see."""
    return {k: v for k, v in environ.items()
            if k in KEEP_NAMES or k.startswith(KEEP_PREFIXES)}


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Supervision:
    """How a process is watched. All times are epoch seconds."""

    deadline: Optional[float] = None  # kill at this time -> TIMED_OUT
    stop_at: Callable[[], Optional[float]] = lambda: None  # drain: stop the job at this time
    tick: Callable[[], None] = lambda: None  # called about every tick_s (keepalive, status)
    save_every_s: Optional[float] = None
    save: Callable[[], None] = lambda: None  # periodic upload
    tick_s: float = 1.0
    term_grace_s: float = 10.0  # SIGTERM -> SIGKILL
    check: Callable[[], Optional[str]] = lambda: None  # a reason to stop the job now (GPU share)
    cancelled: Callable[[], bool] = lambda: False  # someone cancelled it: stop it like a timeout
    stopped_reason: str = ""  # what `check` said, once it said something
    hang_after_s: float = 0.0  # no progress this long -> HUNG (0: never)
    progress: Callable[[], object] = lambda: None  # changes while the job makes progress (CPU, output)


def _hwm(pid: int) -> Optional[int]:
    """VmHWM of a live process, in bytes (None when gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reap(proc: subprocess.Popen, timeout: float) -> int:
    """proc.wait(timeout), looking at the process's high-water mark (VmHWM) every few
    milliseconds while it runs: the largest seen is kept as `proc.hwm` (bytes). (wait4's
    ru_maxrss would not do: a child forked or vforked from the runner starts out with the
    runner's own.) subprocess.TimeoutExpired when it still runs."""
    if proc.returncode is not None:
        return proc.returncode
    end, delay = time.monotonic() + timeout, 0.0005
    while True:
        hwm = _hwm(proc.pid)
        if hwm is not None:
            proc.hwm = max(getattr(proc, "hwm", 0), hwm)
        rc = proc.poll()
        if rc is not None:
            return rc
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        delay = min(delay * 2, remaining, 0.05)
        time.sleep(delay)


def supervise(proc: subprocess.Popen, sv: Supervision) -> tuple[int, Optional[str]]:
    """Wait for `proc` (leader of its own process group) under `sv`.

    Returns (returncode, why we stopped it: TIMED_OUT / INTERRUPTED / None)."""
    stopped_for: Optional[str] = None
    kill_at = None
    next_save = time.time() + sv.save_every_s if sv.save_every_s else None
    seen, progressed = sv.progress(), time.time()
    while True:
        try:
            rc = reap(proc, sv.tick_s)
            break
        except subprocess.TimeoutExpired:
            pass
        drain_at = sv.stop_at() if stopped_for is None else None
        now = time.time()
        if stopped_for is None:
            if sv.deadline is not None and now >= sv.deadline:
                stopped_for = TIMED_OUT
            elif drain_at is not None and now >= drain_at:
                stopped_for = INTERRUPTED
            elif sv.cancelled():
                stopped_for = CANCELLED
            elif sv.hang_after_s > 0:
                now_seen = sv.progress()
                if now_seen != seen:
                    seen, progressed = now_seen, now
                elif now - progressed >= sv.hang_after_s:
                    stopped_for = HUNG
            if stopped_for:
                signal_group(proc.pid, signal.SIGTERM)
                kill_at = now + sv.term_grace_s
            else:
                reason = sv.check()
                if reason:  # over its GPU memory share: the neighbours' memory is at stake, no grace
                    stopped_for, sv.stopped_reason = OVER_GPU_SHARE, reason
                    signal_group(proc.pid, signal.SIGKILL)
                    kill_at = now
        elif now >= kill_at:
            signal_group(proc.pid, signal.SIGKILL)
        sv.tick()
        if next_save is not None and now >= next_save and stopped_for is None:
            sv.save()
            next_save = time.time() + sv.save_every_s
    # the leader is gone; children it left in its group go too
    signal_group(proc.pid, signal.SIGKILL)
    return rc, stopped_for
