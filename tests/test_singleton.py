"""One instance per program: a second slot runner, controller or store waits for the first to
go, then starts; while the first lives it never starts, and says who holds the slot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import singleton
from tests.realparts import wait_for

pytestmark = pytest.mark.integration


def _wrapper(lock: Path, wait: float, *command: str, log: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "appliance.singleton", "--lock", str(lock), "--name", "slot-0",
            "--wait", str(wait), *(["--log", str(log)] if log else []), "--", *command]


def _exec_wrapper(lock: Path, wait: float, *command: str) -> list[str]:
    return [sys.executable, "-m", "appliance.slot.exec", "--slot", "slot-0", "--cpus", "0", "--mems", "0",
            "--memory-bytes", "1048576", "--shm-bytes", "65536", "--lock", str(lock), "--lock-wait", str(wait),
            "--", *command]


@pytest.fixture
def holder(tmp_path):
    """A program that holds slot-0's lock (as a runner left by a dead supervisord would)."""
    lock = tmp_path / "run" / "locks" / "slot-0.lock"
    proc = subprocess.Popen(_wrapper(lock, 0, "sleep", "300"))
    wait_for("the lock to be taken", lambda: singleton.is_held(str(lock)), timeout=30)
    yield proc, lock
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("wrapper", [_wrapper, _exec_wrapper], ids=["singleton", "slot-exec"])
def test_a_second_instance_does_not_start_while_the_first_lives(holder, tmp_path, wrapper):
    proc, lock = holder
    started = tmp_path / "second-started"
    second = subprocess.run(wrapper(lock, 1, "touch", str(started)), capture_output=True, text=True, timeout=60)
    assert second.returncode == singleton.EXIT_BUSY == 75
    assert f"pid {proc.pid}" in second.stderr and "appliance down" in second.stderr
    assert not started.exists()
    assert singleton.holders(str(lock)) == [proc.pid]  # the exec'd program itself holds it
    assert lock.read_text().strip() == str(proc.pid)


def test_a_second_instance_waits_for_the_first_to_stop_then_starts(holder, tmp_path):
    proc, lock = holder
    started = tmp_path / "second-started"
    second = subprocess.Popen(_wrapper(lock, 60, "touch", str(started)), stderr=subprocess.PIPE, text=True)
    line = second.stderr.readline()
    assert "already running" in line and f"pid {proc.pid}" in line and "waiting" in line
    assert second.poll() is None and not started.exists()
    proc.send_signal(signal.SIGTERM)  # the orphan stops (drained)
    assert second.wait(timeout=60) == 0
    assert started.exists()


def test_the_lock_lasts_as_long_as_the_program_and_its_output_goes_to_its_log(tmp_path):
    lock, log = tmp_path / "locks" / "store.lock", tmp_path / "store.log"
    proc = subprocess.run(_wrapper(lock, 0, "sh", "-c", "echo out; echo err >&2", log=log), timeout=60)
    assert proc.returncode == 0
    assert log.read_text() == "out\nerr\n"
    assert not singleton.is_held(str(lock)) and singleton.holders(str(lock)) == []


def test_a_workload_started_by_the_program_does_not_hold_the_lock(tmp_path):
    """Only the program holds it: its children started the usual way (close_fds) do not."""
    lock = tmp_path / "locks" / "slot-0.lock"
    script = ("import subprocess, time; p = subprocess.Popen(['sleep', '300']); print(p.pid, flush=True); "
              "time.sleep(300)")
    proc = subprocess.Popen(_wrapper(lock, 0, sys.executable, "-c", script), stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        assert singleton.holders(str(lock)) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
        os.kill(child, signal.SIGKILL)


def test_no_workload_can_open_a_lock_to_take_it_first(tmp_path):
    """flock needs no write access: a lock file others may open is one a workload could hold to
    stall a restarting runner. Locks are their owner's alone, also those an older version left."""
    locks = tmp_path / "run" / "locks"
    locks.mkdir(parents=True, mode=0o755)
    old = locks / "slot-1.lock"
    old.write_text("")
    old.chmod(0o644)
    for name in ("slot-0", "slot-1"):
        fd = singleton.hold(str(locks / f"{name}.lock"), name, wait_s=0)
        os.close(fd)
    probe = ("import fcntl, os, sys\n"
             "for p in sys.argv[1:]:\n"
             "    try:\n"
             "        fcntl.flock(os.open(p, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "        print('took', p)\n"
             "    except OSError as e:\n"
             "        print(e.strerror)\n")
    out = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", probe,
                          str(locks / "slot-0.lock"), str(old)], capture_output=True, text=True, timeout=30)
    assert out.stdout.splitlines() == ["Permission denied"] * 2, out
    assert oct(locks.stat().st_mode & 0o777) == "0o700"
