"""What `up` and `down` take for a leftover that still runs (appliance/leftovers.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from appliance import leftovers
from appliance.store.server import ports_in_use
from tests.store_fixtures import free_store_port

# the first thread ends (a zombie in /proc/PID/stat) while another still runs and holds the
# process's listening socket, as a store's thread in fsync does after its main thread exits
LEADER_GONE_FIRST = """
import ctypes, socket, sys, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
threading.Thread(target=time.sleep, args=(int(sys.argv[2]),)).start()
print("listening", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def _leader_gone_first(port: int, seconds: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", LEADER_GONE_FIRST, str(port), str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "listening\n"
    deadline = time.monotonic() + 10
    while _state(p.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _state(p.pid) == "Z"
    return p


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_process_whose_first_thread_ended_is_alive_while_another_runs():
    port = free_store_port()
    p = _leader_gone_first(port, 30)
    try:
        assert leftovers._alive(p.pid)
        assert ports_in_use("127.0.0.1", [port]) == [port]
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert not leftovers._alive(p.pid)
    assert ports_in_use("127.0.0.1", [port]) == []


def test_stopping_a_leftover_waits_until_its_port_is_free():
    port = free_store_port()
    p = _leader_gone_first(port, 30)  # its live thread takes the SIGTERM
    leftovers._term_and_wait([p.pid], 10)
    assert ports_in_use("127.0.0.1", [port]) == [], "up would find the store's port in use"
    p.wait()


def test_a_pid_that_is_gone_is_not_alive():
    p = subprocess.Popen(["true"])
    p.wait()
    assert not leftovers._alive(p.pid)
    assert not leftovers._alive(2 ** 22 + 1)  # above pid_max: never a process
