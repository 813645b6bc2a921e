"""Waiting for a child process to end, woken by its exit at once.

`subprocess.Popen.wait(timeout)` polls: it sleeps 0.5 ms, doubling up to 50 ms, between
checks, so a job that ends is noticed up to 50 ms late and a short job's slot idles meanwhile.
A pidfd (Linux 5.3+) becomes readable the moment the process exits: `select` on it wakes then.
"""

from __future__ import annotations

import os
import select
import subprocess
import time


def pause(proc: subprocess.Popen, seconds: float) -> None:
    """Sleep up to `seconds`, less if `proc` ends meanwhile (then at once). Without pidfds (an
    old kernel) or for a child already reaped, a plain sleep (or none)."""
    if proc.returncode is not None:
        return
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd_open here, or the child is reaped already
        time.sleep(max(0.0, seconds))
        return
    try:
        select.select([fd], [], [], max(0.0, seconds))
    except InterruptedError:
        pass
    finally:
        os.close(fd)


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    """proc's exit code once it ends; subprocess.TimeoutExpired after `timeout` seconds, as
    `proc.wait(timeout)` does, but woken by the exit itself instead of a polling sleep."""
    end = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            return rc
        left = end - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        pause(proc, left)
