"""Waiting for a workload's exit (appliance/waiting.py): the exit code, a timeout as
Popen.wait gives it, and a wait that ends when the process does, not when the timeout does."""

from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.waiting import pause, wait_exit


def test_the_exit_code_of_a_process_that_ends():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert wait_exit(proc, 60) == 3
    assert wait_exit(proc, 60) == 3  # reaped already: still its code


def test_a_process_that_runs_on_times_out_as_popen_wait_would():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            wait_exit(proc, 0.1)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_pause_ends_with_the_process_not_with_its_timeout():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    pause(proc, 600)  # returns when it ends (a polling sleep would be the whole 600 s)
    assert proc.poll() == 0
