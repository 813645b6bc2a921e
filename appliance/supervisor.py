"""Talking to the appliance's supervisord: start it, ask it things over XML-RPC, apply a diff.

supervisord's `update` restarts a whole group, so every slot is its own program and a diff is
applied program by program: removed and changed ones stop (the runner drains), then changed and
added ones are added. Unchanged programs keep their PIDs.

`shutdown` stops in order: the controller (so it re-adds no slot), every slot at once (runners
drain, uploading to the store), the store, then supervisord. Not `stopAllProcesses`: it starts
with the lowest priority, the store, and the draining runners' uploads then fail.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

from appliance.paths import Home

RUNNING_STATES = ("RUNNING",)
FAILED_STATES = ("FATAL", "BACKOFF", "EXITED", "UNKNOWN")


class SupervisorError(RuntimeError):
    pass


def rpc(home: Home):
    """A fresh proxy (a transport that failed once keeps failing, so never reuse one)."""
    return xmlrpc.client.ServerProxy("http://localhost", transport=UnixTransport(str(home.supervisor_socket)),
                                     allow_none=True)


class UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over supervisord's unix socket, one kept connection, each call sent once: what
    supervisor.xmlrpc.SupervisorTransport does, without importing the supervisor package
    (~4 MB of the long-lived controller's memory)."""

    accept_gzip_encoding = False

    def __init__(self, socket_path: str):
        super().__init__()
        self.socket_path = socket_path

    def make_connection(self, host):
        if self._connection[1] is None:
            self._connection = host, _UnixHTTPConnection(self.socket_path)
        return self._connection[1]

    def request(self, host, handler, request_body, verbose=False):
        return self.single_request(host, handler, request_body, verbose)  # never twice: not all calls are idempotent


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str):
        super().__init__("localhost")
        self.socket_path = socket_path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)


def is_running(home: Home) -> bool:
    if not home.supervisor_socket.exists():
        return False
    try:
        return rpc(home).supervisor.getState()["statename"] == "RUNNING"
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        return False


def supervisord_pid(home: Home) -> int | None:
    """The pid of this home's supervisord while it lives (a stale pidfile's recycled pid is not it)."""
    try:
        pid = int(home.supervisord_pid.read_text().strip())
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"supervisord" in cmdline and _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_supervisord(home: Home, foreground: bool = False, timeout: float = 20) -> None:
    """Start supervisord with the rendered config; daemonized unless `foreground` (systemd)."""
    argv = [sys.executable, "-m", "supervisor.supervisord", "-c", str(home.supervisord_conf)]
    if foreground:
        os.execv(sys.executable, argv + ["-n"])
    log = home.logs_dir / "supervisord.log"
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SupervisorError(f"supervisord did not start: {(result.stderr or result.stdout).strip()} "
                              f"(see {log})")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_running(home):
            return
        time.sleep(0.05)
    raise SupervisorError(f"supervisord started but its socket {home.supervisor_socket} does not answer; see {log}")


@dataclass(frozen=True)
class ProcessInfo:
    name: str
    state: str
    pid: int
    started: int
    description: str
    exitstatus: int

    @classmethod
    def from_rpc(cls, info: dict) -> "ProcessInfo":
        return cls(info["name"], info["statename"], info["pid"], info["start"], info["description"],
                   info["exitstatus"])


def processes(home: Home) -> dict[str, ProcessInfo]:
    return {i["name"]: ProcessInfo.from_rpc(i) for i in rpc(home).supervisor.getAllProcessInfo()}


def apply_config(home: Home, wait: bool = True) -> tuple[list[str], list[str], list[str]]:
    """Reload the rendered config and apply only the difference. Returns (added, changed, removed)."""
    server = rpc(home)
    [[added, changed, removed]] = server.supervisor.reloadConfig()
    for name in removed + changed:
        try:
            server.supervisor.stopProcessGroup(name, wait)
        except xmlrpc.client.Fault as e:
            if "NOT_RUNNING" not in e.faultString:
                raise
        server.supervisor.removeProcessGroup(name)
    for name in changed + added:
        server.supervisor.addProcessGroup(name)
    return added, changed, removed


CONTROLLER = "controller"
STORE = "store"
STOPPED = ("STOPPED", "EXITED", "FATAL", "UNKNOWN")


def _stop(server, name: str, wait: bool) -> None:
    try:
        server.supervisor.stopProcessGroup(name, wait)
    except xmlrpc.client.Fault as e:
        if "NOT_RUNNING" not in e.faultString and "BAD_NAME" not in e.faultString:
            raise


def stop_in_order(home: Home, timeout: float) -> None:
    """Controller, then every slot in parallel (their runners drain), then the store.

    supervisord itself kills a slot whose runner outlives its stopwaitsecs; `timeout` bounds
    the whole wait on top of that. Raises SupervisorError if a slot is still up at the end."""
    deadline = time.monotonic() + timeout
    server = rpc(home)
    if CONTROLLER in processes(home):
        _stop(server, CONTROLLER, True)
    names = list(processes(home))  # after the controller stopped: it may have just added a slot
    slots = [n for n in names if n not in (CONTROLLER, STORE)]
    for name in slots:
        _stop(rpc(home), name, False)  # SIGTERM to each now: they drain side by side
    while slots:
        states = processes(home)
        slots = [n for n in slots if n in states and states[n].state not in STOPPED]
        if not slots:
            break
        if time.monotonic() > deadline:
            raise SupervisorError(f"{', '.join(slots)} did not stop within {timeout:.0f}s")
        time.sleep(0.2)
    if STORE in names:
        _stop(rpc(home), STORE, True)


def shutdown(home: Home, timeout: float) -> None:
    """Stop every program in order (`stop_in_order`), then supervisord; wait until it is gone."""
    pid = supervisord_pid(home)
    deadline = time.monotonic() + timeout
    try:
        stop_in_order(home, timeout)
    except SupervisorError:
        deadline = time.monotonic() + 30  # supervisord kills what is left as it shuts down
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        pass  # supervisord is going or gone: it stops what is left itself, and `down` sweeps after
    try:
        rpc(home).supervisor.shutdown()
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        pass
    if pid is None:
        return
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    raise SupervisorError(f"supervisord (pid {pid}) did not exit within {timeout:.0f}s")


def tail_log(home: Home, program: str, lines: int = 15) -> str:
    path = home.logs_dir / f"{program}.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
