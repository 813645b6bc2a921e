"""Two appliances (two homes on this machine stand in for two hosts) consuming one RabbitMQ
queue share its work; one is killed mid-job and the other runs its unacknowledged messages.
Real RabbitMQ, real supervisord and slots, one shared S3 store; the jobs note where they ran."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path

from appliance.queues.rabbitmq import publish
from tests.rabbitmq_fixtures import marker_lines, marker_request, upload_marker_workspace
from tests.realparts import wait_for


def descendants(pid: int) -> list[int]:
    children: dict = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def kill_appliance(appliance) -> None:
    """Pull the plug: SIGKILL supervisord and everything under it, no drain, no goodbye."""
    pid = int(appliance.home.supervisord_pid.read_text())
    victims = [pid] + descendants(pid)
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rabbit_appliance(tmp_path: Path, name: str, rabbit):
    from tests.appliance_fixtures import make_home

    appliance = make_home(tmp_path / name, f'python = "{sys.executable}"\n')  # [runner] section
    creds = appliance.home.credentials_dir
    creds.mkdir(parents=True, exist_ok=True)
    (creds / "shared.toml").write_text(rabbit.credential())
    return appliance


def test_two_appliances_share_a_queue_and_survive_one_being_killed(rabbit, store, tmp_path):
    from tests.appliance_fixtures import stop_home

    queue = f"rmq_shared_{uuid.uuid4().hex[:6]}"
    marker = tmp_path / "marker.log"
    ws_key = upload_marker_workspace(store, tmp_path)
    a = rabbit_appliance(tmp_path, "a", rabbit)
    b = rabbit_appliance(tmp_path, "b", rabbit)
    try:
        a.cli("up", "--timeout", "90")
        b.cli("up", "--timeout", "90")
        keys = []
        for _ in range(4):
            key, body = marker_request(store, ws_key, marker, seconds=8)
            publish(rabbit.url, queue, body)
            keys.append(key)

        def started_on(appliance):
            root = str(appliance.root)
            return {k for what, k, cwd in marker_lines(marker) if what == "start" and cwd.startswith(root)}

        # both appliances take work from the one queue
        wait_for("both appliances to run jobs", lambda: started_on(a) and started_on(b), timeout=60)
        killed = started_on(a)
        assert not {k for what, k, _ in marker_lines(marker) if what == "done"} & killed
        kill_appliance(a)

        # every message still completes; the killed ones ran again, on b
        wait_for("every job done", lambda: {k for w, k, _ in marker_lines(marker) if w == "done"} >= set(keys),
                 timeout=120)
        lines = marker_lines(marker)
        for key in killed:
            runs = [cwd for w, k, cwd in lines if w == "start" and k == key]
            assert len(runs) == 2 and runs[-1].startswith(str(b.root)), (key, runs)
        done = [k for w, k, _ in lines if w == "done"]
        assert sorted(done) == sorted(keys)  # each exactly once
        wait_for("the queue to be empty", lambda: rabbit.queue_depths().get(queue) == (0, 0), timeout=30)
    finally:
        stop_home(b)
        stop_home(a)
