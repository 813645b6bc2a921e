"""Waiting for a child process to end, woken by its exit at once.

`subprocess.Popen.wait(timeout)` polls: it sleeps 0.5 ms, doubling up to 50 ms, between
checks, so a job that ends is noticed up to 50 ms late and a short job's slot idles meanwhile.
A pidfd (Linux 5.3+) becomes readable the moment the process exits: `select` on it wakes then.
"""

from __future__ import annotations

import os
import select
import subprocess


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    """proc's exit code once it ends; subprocess.TimeoutExpired after `timeout` seconds, as
    `proc.wait(timeout)` does. Without pidfds (old kernel) it is `proc.wait(timeout)`."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd_open here, or the child is reaped already
        return proc.wait(timeout=timeout)
    try:
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
    except InterruptedError:
        ready = []
    finally:
        os.close(fd)
    if not ready:
        raise subprocess.TimeoutExpired(proc.args, timeout)
    return proc.wait()
