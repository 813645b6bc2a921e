"""`appliance down` with a job in flight, and a supervisord that dies: real supervisord, store,
cgroups and runners. A job in flight is never run twice, and nothing is left running."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

from tests.appliance_fixtures import artifact_text, last_result, submit
from tests.realparts import wait_for

pytestmark = pytest.mark.integration

JOB = (
    "import os, sys, time\n"
    "with open(sys.argv[1], 'a') as f:\n"  # one line per run, outside the job dir
    "    f.write(os.environ['STUDIOML_EXPERIMENT'] + '\\n')\n"
    "print('started', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "print('done', flush=True)\n"
)


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "job.py").write_text(JOB)
    return ws


@pytest.fixture
def runs():
    """A file each run of a job appends a line to; writable by any uid a runner may drop to."""
    folder = Path(tempfile.mkdtemp(prefix="appliance-runs-", dir="/tmp"))
    folder.chmod(0o777)
    path = folder / "runs.txt"
    path.touch()
    path.chmod(0o666)
    yield path
    path.unlink(missing_ok=True)
    folder.rmdir()


def _runs_of(runs: Path, key: str) -> int:
    return runs.read_text().split().count(key)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (supervisord: the store, the controller, runners, workloads)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _processes_of(appliance) -> dict[str, list[int]]:
    """This home's runners by slot, and its controller and store, by their command lines."""
    root = str(appliance.root)
    found: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not _alive(int(entry)):
            continue
        if "appliance.runner" in argv and root in argv:
            found.setdefault(argv[argv.index("--slot") + 1], []).append(int(entry))
        elif "appliance.controller" in argv and root in argv:
            found.setdefault("controller", []).append(int(entry))
        elif os.path.basename(argv[0]) == "weed" and any(a.startswith(f"-dir={root}") for a in argv):
            found.setdefault("store", []).append(int(entry))
    return found


def _running_job(appliance, key):
    return next((s for s in appliance.status()["slots"]
                 if s["experiment"] == key and s["runner_state"] == "running"), None)


def _not_in_queues(appliance, key) -> bool:
    queues = json.loads(appliance.cli("queue", "ls", "--json").stdout)
    return key not in json.dumps(queues) and key not in appliance.cli("queue", "dead").stdout


def test_down_lets_the_job_in_flight_finish_and_it_does_not_run_again(appliance_home, workspace, runs):
    appliance_home.cli("up", "--timeout", "90")
    key = submit(appliance_home, workspace, "job.py", str(runs), "8")
    wait_for("the job to start", lambda: _running_job(appliance_home, key))

    started = time.monotonic()
    appliance_home.cli("down")
    print(f"down with a job in flight took {time.monotonic() - started:.1f}s")

    assert last_result(appliance_home, key)["outcome"] == "success"  # it finished while its runner drained
    assert _not_in_queues(appliance_home, key)  # acked: nothing waiting, claimed or dead

    appliance_home.cli("up", "--timeout", "90")
    assert "done" in wait_for("the output artifact", lambda: artifact_text(appliance_home, key))
    marker = submit(appliance_home, workspace, "job.py", str(runs), "0")
    assert wait_for("a later job to finish", lambda: last_result(appliance_home, marker))["outcome"] == "success"
    assert _runs_of(runs, key) == 1


def test_up_after_supervisord_was_killed_stops_what_it_left_and_the_job_is_not_lost(appliance_home, workspace,
                                                                                     runs):
    appliance_home.cli("up", "--timeout", "90")
    key = submit(appliance_home, workspace, "job.py", str(runs), "8")
    wait_for("the job to start", lambda: _running_job(appliance_home, key))
    supervisord = int(appliance_home.home.supervisord_pid.read_text())
    before = _descendants(supervisord)
    assert {"controller", "store"} <= set(_processes_of(appliance_home))

    os.kill(supervisord, signal.SIGKILL)  # its children live on as orphans
    wait_for("supervisord to die", lambda: not _alive(supervisord))
    assert any(_alive(p) for p in before)

    appliance_home.cli("up", "--timeout", "90")
    assert not [p for p in before if _alive(p)]  # every orphan stopped (the job drained first)
    now = _processes_of(appliance_home)
    slots = [s["name"] for s in appliance_home.status()["slots"]]
    assert {name: len(now.get(name, [])) for name in slots + ["controller", "store"]} == \
        {name: 1 for name in slots + ["controller", "store"]}  # exactly one of each

    def settled():  # finished while its orphaned runner drained, or put back and run again
        result = last_result(appliance_home, key)
        return result if result and result["outcome"] != "released" else None

    result = wait_for("the job to finish", settled, timeout=240)
    assert result["outcome"] == "success", result
    assert "done" in wait_for("the output artifact", lambda: artifact_text(appliance_home, key))
    assert _not_in_queues(appliance_home, key)  # not dead-lettered, nothing left of it

    # `down` with supervisord killed again stops everything it left
    supervisord = int(appliance_home.home.supervisord_pid.read_text())
    before = _descendants(supervisord)
    os.kill(supervisord, signal.SIGKILL)
    wait_for("supervisord to die", lambda: not _alive(supervisord))
    appliance_home.cli("down")
    assert not [p for p in before if _alive(p)]
    assert _processes_of(appliance_home) == {}
