"""Talking to the appliance's supervisord: start it, ask it things over XML-RPC, apply a diff.

supervisord's `update` restarts a whole group, so every slot is its own program and a diff is
applied program by program: removed and changed ones stop (the runner drains), then changed and
added ones are added. Unchanged programs keep their PIDs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass

from supervisor.xmlrpc import SupervisorTransport

from appliance.paths import Home

RUNNING_STATES = ("RUNNING",)
FAILED_STATES = ("FATAL", "BACKOFF", "EXITED", "UNKNOWN")


class SupervisorError(RuntimeError):
    pass


def rpc(home: Home):
    """A fresh proxy (a transport that failed once keeps failing, so never reuse one)."""
    transport = SupervisorTransport(None, None, f"unix://{home.supervisor_socket}")
    return xmlrpc.client.ServerProxy("http://appliance", transport=transport, allow_none=True)


def is_running(home: Home) -> bool:
    if not home.supervisor_socket.exists():
        return False
    try:
        return rpc(home).supervisor.getState()["statename"] == "RUNNING"
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        return False


def supervisord_pid(home: Home) -> int | None:
    try:
        pid = int(home.supervisord_pid.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


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


def shutdown(home: Home, timeout: float) -> None:
    """Stop every program (slots drain first) then supervisord itself; wait until it is gone."""
    pid = supervisord_pid(home)
    try:
        server = rpc(home)
        server.supervisor.stopAllProcesses(True)
        server.supervisor.shutdown()
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        pass
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise SupervisorError(f"supervisord (pid {pid}) did not exit within {timeout:.0f}s")


def tail_log(home: Home, program: str, lines: int = 15) -> str:
    path = home.logs_dir / f"{program}.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
