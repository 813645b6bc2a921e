"""`appliance top` in a real terminal (tmux): a real appliance runs a job that prints a line and
sleeps; the live view shows the slot, the job and that line, redraws on a resize, and quits on
`q` or Ctrl-C without a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid

import pytest

from tests.appliance_fixtures import submit
from tests.realparts import need, wait_for

pytestmark = pytest.mark.integration

JOB = (
    "import time\n"
    "print('warming up', flush=True)\n"
    "print('epoch 1 loss 0.4242', flush=True)\n"
    "time.sleep(600)\n"
)


class Tmux:
    """A tmux server of the test's own (its own socket), one session running one command."""

    def __init__(self, tmp_path, width=120, height=40):
        need(shutil.which("tmux") is not None, "tmux (apt-get install tmux)")
        self.socket = str(tmp_path / "tmux.sock")
        self.session = f"top-{uuid.uuid4().hex[:6]}"
        self.size = (width, height)

    def tmux(self, *args, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True,
                              check=check, timeout=30)

    def start(self, command: str) -> None:
        self.tmux("new-session", "-d", "-s", self.session, "-x", str(self.size[0]), "-y", str(self.size[1]),
                  command)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session, check=False).stdout

    def wait_screen(self, what: str, predicate, timeout: float = 60) -> str:
        """The screen once `predicate(screen)` holds; on a timeout the failure shows the screen."""
        try:
            return wait_for(what, lambda: (lambda text: text if predicate(text) else None)(self.screen()), timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; the screen:\n{self.screen()}") from None

    def close(self) -> None:
        self.tmux("kill-server", check=False)


@pytest.fixture
def tmux(tmp_path):
    t = Tmux(tmp_path)
    yield t
    t.close()


@pytest.fixture(scope="module")
def busy_appliance(running_appliance, tmp_path_factory):
    """The module's appliance with a job running that has printed its line."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "job.py").write_text(JOB)
    key = submit(running_appliance, ws, "job.py")
    wait_for("the job to run", lambda: any(s["experiment"] == key and s["runner_state"] == "running"
                                           for s in running_appliance.status()["slots"]))
    return running_appliance, key


def _top_command(appliance, tmp_path, action="top") -> tuple[str, object, object]:
    rc, err = tmp_path / "rc", tmp_path / "stderr"
    env = " ".join(f"{k}={v}" for k, v in appliance.env.items()
                   if k in ("APPLIANCE_CGROUP_PARENT", "PYTHONPATH", "APPLIANCE_FAKE_NVML"))
    words = " ".join(action.split())
    cmd = (f"env {env} {sys.executable} -m appliance --home {appliance.root} {words} 2>{err}; "
           f"echo $? > {rc}; sleep 600")
    return cmd, rc, err


def test_top_shows_the_running_job_and_its_last_line_resizes_and_quits_on_q(busy_appliance, tmux, tmp_path):
    appliance, key = busy_appliance
    slot = next(s["name"] for s in appliance.status()["slots"] if s["experiment"] == key)
    cmd, rc, err = _top_command(appliance, tmp_path)
    tmux.start(cmd)

    screen = tmux.wait_screen("top to show the job and its last line",
                              lambda text: key in text and "epoch 1 loss 0.4242" in text)
    row = next(line for line in screen.splitlines() if line.startswith(slot))
    assert "running" in row and key in row, screen
    assert "QUEUES" in screen and "STORE" in screen and "healthy" in screen, screen
    assert all(len(line) <= 120 for line in screen.splitlines())

    tmux.tmux("resize-window", "-t", tmux.session, "-x", "70", "-y", "15")
    screen = tmux.wait_screen("top to redraw at 70 columns", lambda text: "epoch 1 loss" in text and all(
        len(line) <= 70 for line in text.splitlines()) and any(line.startswith(slot) for line in text.splitlines()))
    assert len(screen.splitlines()) <= 15

    tmux.tmux("send-keys", "-t", tmux.session, "q")
    wait_for("top to exit", lambda: rc.exists() and rc.read_text().strip(), timeout=30)
    assert rc.read_text().strip() == "0"
    assert err.read_text() == ""


def test_ctrl_c_quits_without_a_traceback_and_status_watch_is_live_too(busy_appliance, tmux, tmp_path):
    appliance, key = busy_appliance
    cmd, rc, err = _top_command(appliance, tmp_path, "status --watch")
    tmux.start(cmd)
    tmux.wait_screen("status --watch to show the job", lambda text: key in text and "q quits" in text)
    tmux.tmux("send-keys", "-t", tmux.session, "C-c")
    wait_for("status --watch to exit", lambda: rc.exists() and rc.read_text().strip(), timeout=30)
    assert rc.read_text().strip() == "0"
    assert "Traceback" not in err.read_text()


def test_without_a_terminal_top_prints_one_frame(busy_appliance):
    appliance, key = busy_appliance
    out = appliance.cli("top", timeout=60).stdout
    assert key in out and "epoch 1 loss 0.4242" in out
    assert "SLOT" in out and "QUEUES" in out


def test_on_a_dumb_terminal_top_prints_one_frame_and_exits(busy_appliance, tmux, tmp_path):
    appliance, key = busy_appliance
    cmd, rc, err = _top_command(appliance, tmp_path)
    tmux.start(f"env TERM=dumb {cmd}")
    wait_for("top to exit", lambda: rc.exists() and rc.read_text().strip(), timeout=60)
    assert rc.read_text().strip() == "0" and err.read_text() == ""
    screen = tmux.screen()
    assert "SLOT" in screen and "epoch 1 loss 0.4242" in screen, screen


# ------------------------------------------------------------------ CPU use of a slot


def test_a_gpu_slot_shows_its_gpu_busy_and_memory(tmp_path, monkeypatch):
    """NVML faked at the pynvml boundary (its utilisation rates as nvmlDeviceGetUtilizationRates gives them)."""
    import pynvml

    from appliance.actions.top import render_top
    from appliance.gpus import gpu_usage
    from appliance.paths import Home
    from appliance.status import gather
    from tests.fake_nvml import shim

    for name in dir(pynvml):
        if name.startswith("nvml"):
            monkeypatch.setattr(pynvml, name, getattr(pynvml, name))  # put back after the test
    shim.write_gpus(tmp_path / "gpus.json", [shim.fake_gpu(0, util=37)])
    shim.install(tmp_path / "gpus.json")
    [usage] = gpu_usage([0])
    assert usage.utilization == 37 and usage.memory_total_bytes == 8 << 30

    facts = gather(Home.at(tmp_path / "home"))
    facts["slots"] = [{"name": "slot-0", "state": "RUNNING", "runner_state": "running", "cpus": [2, 3],
                       "cpu_used": 1.5, "memory_used_bytes": 1 << 30, "memory_bytes": 8 << 30, "gpu_indexes": [0],
                       "experiment": "exp-1", "job_started": None, "queue": "local_gpu", "last_result": None,
                       "last_line": "step 10"}]
    facts["gpu_usage"] = {usage.index: usage.__dict__}
    frame = "\n".join(render_top(facts, 200))
    row = next(line for line in frame.splitlines() if line.startswith("slot-0"))
    assert "1.50/2" in row and "1GiB/8GiB" in row and "0: 37% 0B/8GiB" in row and "exp-1" in row, frame
    assert "> step 10" in frame
