"""A real RabbitMQ (Debian `rabbitmq-server`) for the tests: an ordinary process bound to
127.0.0.1 on free ports, with a private node name, database, logs, Erlang cookie and epmd, and
the management plugin (queues are found through its bindings API, as StudioML's runner does)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.realparts import free_port, need

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


@dataclass
class RunningRabbit:
    url: str  # amqp://guest:guest@127.0.0.1:PORT/%2f
    management: str  # http://127.0.0.1:PORT
    amqp_port: int
    root: Path
    env: dict
    process: subprocess.Popen

    def credential(self, user: str = "guest", password: str = "guest", management: bool = True) -> str:
        """The text of a credentials entry for this broker."""
        url = f"amqp://{user}:{password}@127.0.0.1:{self.amqp_port}/%2f"
        text = f'url = "{url}"\n'
        if management:
            text += f'management = "{self.management}"\n'
        return text

    def ctl(self, *args) -> str:
        return subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", *args], env=self.env,
                              capture_output=True, text=True, timeout=60, check=True).stdout

    def queue_depths(self) -> dict:
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "messages_ready",
                       "messages_unacknowledged")
        depths = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3:
                depths[parts[0]] = (int(parts[1]), int(parts[2]))
        return depths


def management_answers(management: str) -> bool:
    """Whether RabbitMQ's management API answers (as the guest user)."""
    try:
        req = urllib.request.Request(f"{management}/api/overview",
                                     headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="})
        with urllib.request.urlopen(req, timeout=2):
            return True
    except OSError:
        return False


def start_rabbit(root: Path, consumer_timeout_ms: int | None = None) -> RunningRabbit:
    need(Path(SERVER).exists(), "rabbitmq-server (apt-get install rabbitmq-server)")
    root.mkdir(parents=True, exist_ok=True)
    amqp, mgmt, dist, epmd = free_port(), free_port(), free_port(), free_port()
    conf = [f"listeners.tcp.1 = 127.0.0.1:{amqp}", f"management.tcp.port = {mgmt}",
            "management.tcp.ip = 127.0.0.1", "loopback_users = none"]
    if consumer_timeout_ms:
        conf.append(f"consumer_timeout = {consumer_timeout_ms}")
    (root / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
    (root / "enabled_plugins").write_text("[rabbitmq_management].\n")
    node = f"apptest{uuid.uuid4().hex[:8]}@localhost"
    env = {"PATH": "/usr/sbin:/usr/bin:/bin", "HOME": str(root), "LANG": "C.UTF-8",
           "RABBITMQ_MNESIA_BASE": str(root / "mnesia"), "RABBITMQ_LOG_BASE": str(root / "log"),
           "RABBITMQ_NODENAME": node, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
           "RABBITMQ_NODE_PORT": str(amqp), "RABBITMQ_DIST_PORT": str(dist),
           "ERL_EPMD_ADDRESS": "127.0.0.1", "ERL_EPMD_PORT": str(epmd),
           "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq"),
           "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
           "RABBITMQ_PID_FILE": str(root / "rabbit.pid"),
           "ERL_CRASH_DUMP": str(root / "erl_crash.dump")}  # not into the checkout when it fails
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([SERVER], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                            start_new_session=True)
    management = f"http://127.0.0.1:{mgmt}"
    running = RunningRabbit(f"amqp://guest:guest@127.0.0.1:{amqp}/%2f", management, amqp, root, env, proc)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if management_answers(management):
            return running
        time.sleep(0.3)
    stop_rabbit(running)
    raise RuntimeError(f"test RabbitMQ did not come up:\n{(root / 'server.log').read_text()[-3000:]}")


def stop_rabbit(r: RunningRabbit) -> None:
    try:
        os.killpg(r.process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        r.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(r.process.pid, signal.SIGKILL)
        r.process.wait()
    epmd = shutil.which("epmd") or "/usr/lib/erlang/erts-13.1.5/bin/epmd"
    subprocess.run([epmd, "-port", r.env["ERL_EPMD_PORT"], "-kill"], env=r.env,
                   capture_output=True, timeout=10)


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory):
    running = start_rabbit(tmp_path_factory.mktemp("rabbitmq"))
    yield running
    stop_rabbit(running)


# ---------------------------------------------------------------- StudioML messages for rmq_ queues

MARKER_SCRIPT = (
    "import os, sys, time\n"
    "marker, key, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])\n"
    "def note(what):\n"
    "    with open(marker, 'a') as f:\n"
    "        f.write(f'{what} {key} {os.getcwd()} {os.getpid()} {time.time()}\\n')\n"
    "note('start')\n"
    "time.sleep(seconds)\n"
    "note('done')\n")


def upload_marker_workspace(store, tmp_path: Path) -> str:
    """Pack and upload a workspace whose train.py notes start/done in a marker file; its key."""
    from appliance.store.client import ensure_bucket
    from appliance.workspace import pack_directory, workspace_key

    ensure_bucket(store.endpoint_url, store.access_key, store.secret_key, store.bucket)
    ws = tmp_path / f"ws-{uuid.uuid4().hex[:6]}"
    ws.mkdir()
    (ws / "train.py").write_text(MARKER_SCRIPT)
    tar, sha = pack_directory(ws)
    key = workspace_key(sha)
    store.client().upload_file(str(tar), store.bucket, key)
    Path(tar).unlink()
    return key


def marker_request(store, ws_key: str, marker: Path, seconds: float, key: str | None = None) -> tuple[str, bytes]:
    """A StudioML request (as the studioml client writes it) running the marker workspace."""
    import json
    import sys
    import time

    from appliance.actions.submit import build_request

    key = key or f"exp-{uuid.uuid4().hex[:10]}"
    if not marker.exists():  # the workload appends as its slot's unprivileged account
        marker.touch()
        marker.chmod(0o666)
    resources = {"cpus": 1, "gpus": 0, "ram": "128mb", "hdd": "100mb", "gpuMem": "0gb"}
    body = build_request(key=key, script="train.py", script_args=[str(marker), key, str(seconds)],
                         workspace_key=ws_key, workspace_dir="/client/ws", endpoint=store.endpoint_url,
                         bucket=store.bucket, access_key=store.access_key, secret_key=store.secret_key,
                         region="us-east-1", resources=resources, max_duration=None, lifetime=None,
                         save_every="3m", env={}, pip=[], pythonenv=[],
                         pythonver="%d.%d" % sys.version_info[:2], studioml_home=Path("/client/.studioml"),
                         now=time.time())
    return key, json.dumps(body).encode()


def marker_lines(marker: Path) -> list[tuple[str, str, str]]:
    """(what, key, cwd) per line of the marker file."""
    try:
        text = marker.read_text()
    except FileNotFoundError:
        return []
    return [tuple(line.split()[:3]) for line in text.splitlines() if len(line.split()) >= 3]
