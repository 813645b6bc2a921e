"""The warm interpreter (runner/warm.py): a job like the last one becomes the interpreter that
started while the slot was idle, and the workload cannot tell it from `python script.py`
started at that moment; any other job is forked the cold way."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import pytest

from appliance.runner import warm
from appliance.runner.execute import Launcher, Supervision, run_workload
from tests.test_launcher import PROBE

ENV = {"PATH": os.defpath, "LANG": "C.UTF-8", "ODD": "a b\n'c\"", "PYTHONUNBUFFERED": "1"}
NOBODY = (65534, 65534)


@pytest.mark.parametrize("argv, env, user, serves", [
    ([sys.executable, "job.py", "a"], ENV, None, True),
    ([sys.executable, "-m", "pkg.main"], ENV, None, True),
    ([sys.executable, "job.py"], {**ENV, "HOME": "/job/.home", "TMPDIR": "/job/.tmp"}, None, True),
    (["/usr/bin/other-python", "job.py"], ENV, None, False),      # another interpreter
    ([sys.executable, "job.py"], {**ENV, "PYTHONPATH": "/x"}, None, False),  # read at start-up
    ([sys.executable, "job.py"], {**ENV, "LANG": "C"}, None, False),  # the locale, at start-up
    ([sys.executable, "job.py"], {**ENV, "EXTRA": "1"}, None, False),  # a .pth file may read it
    ([sys.executable, "job.py"], {k: v for k, v in ENV.items() if k != "ODD"}, None, False),
    ([sys.executable, "job.py"], ENV, NOBODY, False),              # another account
    ([sys.executable, "-c", "print(1)"], ENV, None, False),        # only a script or -m
    ([sys.executable, "-m"], ENV, None, False),
    ([sys.executable, "-u", "job.py"], ENV, None, False),
    ([sys.executable], ENV, None, False),
])
def test_which_jobs_a_warm_interpreter_serves(argv, env, user, serves):
    assert warm.serves(sys.executable, warm.startup_env(ENV), None, argv, env, user) is serves


def run(tmp_path, name, launcher, argv_tail, files, env=ENV, slot=None):
    ws = tmp_path / name / "ws"
    ws.mkdir(parents=True)
    for rel, text in files.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(text)
    out = tmp_path / name / "output"
    out.write_text("earlier line\n")
    waiting = launcher.proc.pid if launcher is not None and launcher.proc is not None else None
    started = {}
    result = run_workload([sys.executable, *argv_tail], ws, dict(env), out, Supervision(tick_s=0.05),
                          slot=slot, launcher=launcher, on_start=lambda p: started.update(pid=p.pid))
    text = out.read_text().replace(str(tmp_path / name), "D")
    return result, text, started.get("pid") == waiting


def warmed(slot=None, env=ENV, user=None) -> Launcher:
    launcher = Launcher(slot)
    launcher.warm(sys.executable, warm.startup_env(env), user)
    return launcher


def test_a_warm_workload_is_the_same_as_a_forked_one(tmp_path):
    launcher = warmed()
    try:
        time.sleep(0.2)  # let it come up, as it does while the slot is idle
        per_job = {**ENV, "HOME": "/per/job/home", "TMPDIR": "/per/job/tmp"}  # set once the job comes
        r1, hot, was_warm = run(tmp_path, "warm", launcher, ["probe.py", "x y", ""], {"probe.py": PROBE}, env=per_job)
        r2, cold, _ = run(tmp_path, "cold", None, ["probe.py", "x y", ""], {"probe.py": PROBE}, env=per_job)
    finally:
        launcher.close()
    assert was_warm and r1.ok and r2.ok
    hot = json.loads(hot.splitlines()[1])
    cold = json.loads(cold.splitlines()[1])
    assert hot == cold
    assert hot["argv"] == ["probe.py", "x y", ""] and hot["env"]["ODD"] == "a b\n'c\""
    assert (hot["env"]["HOME"], hot["env"]["TMPDIR"]) == ("/per/job/home", "/per/job/tmp")
    assert hot["leader"] and hot["oom_score_adj"] == "1000" and hot["extra_fds"] == 0


SCRIPT = """
import os, sys
print(sorted(k for k in globals() if k != 'os' and k != 'sys'), __name__, __file__)
print(sys.argv, sys.path[0], sys.orig_argv[1:], os.getcwd(), os.environ.get("HOME"))
"""
RAISES = "def f():\n    1/0\nf()\n"


@pytest.mark.parametrize("argv_tail, files", [
    (["s.py", "a"], {"s.py": SCRIPT}),
    (["sub/link.py"], {"s.py": SCRIPT, "sub/link.py": "import runpy; runpy.run_path('s.py')\n"}),
    (["-m", "pkg.main", "b"], {"pkg/__init__.py": "", "pkg/main.py": SCRIPT}),
    (["raises.py"], {"raises.py": RAISES}),
    (["bad.py"], {"bad.py": "x = (\n"}),
    (["exits.py"], {"exits.py": "import sys; print('bye'); sys.exit(3)"}),
    (["missing.py"], {}),
    (["-m", "no_such_module"], {}),
    (["threads.py"], {"threads.py": "import threading, time\n"
                                    "threading.Thread(target=lambda: (time.sleep(0.2), print('late'))).start()\n"
                                    "import atexit; atexit.register(lambda: print('atexit'))\n"}),
])
def test_what_a_script_sees_and_how_it_ends_are_the_cold_ones(tmp_path, argv_tail, files):
    env = {**ENV, "HOME": "/per/job/home"}
    launcher = warmed()
    try:
        hot, hot_text, was_warm = run(tmp_path, "a", launcher, argv_tail, files, env=env)
    finally:
        launcher.close()
    cold, cold_text, _ = run(tmp_path, "a2", None, argv_tail, files, env=env)
    assert was_warm
    assert (hot.outcome, hot.exit_code, hot.reason) == (cold.outcome, cold.exit_code, cold.reason)
    assert hot_text == cold_text


def test_a_job_it_does_not_serve_is_forked_and_the_interpreter_goes(tmp_path):
    launcher = warmed()
    waiting = launcher.proc
    try:
        result, text, was_warm = run(tmp_path, "other", launcher, ["s.py"],
                                     {"s.py": "import os; print(os.environ['EXTRA'])"},
                                     env={**ENV, "EXTRA": "set by this request"})
    finally:
        launcher.close()
    assert result.ok and not was_warm
    assert text == "earlier line\nset by this request\n"
    assert waiting.returncode is not None  # killed, never handed a job


@pytest.mark.parametrize("setpriv", [True, False], ids=["setpriv", "subprocess"])
def test_it_waits_as_the_workloads_account_in_the_job_cgroup(tmp_path, slot_cgroup, setpriv, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch accounts")
    if not setpriv:  # a box without util-linux's setpriv: subprocess changes the account
        monkeypatch.setattr(warm, "SETPRIV", None)
    elif warm.SETPRIV is None:
        pytest.fail("setpriv (util-linux) is missing on this box")
    os.chmod(tmp_path, 0o755)
    launcher = warmed(slot=slot_cgroup, user=NOBODY)
    try:
        pid = launcher.proc.pid
        assert launcher.ready()  # moved into the job cgroup (by a second thread)
        launcher.channel.settimeout(30)
        assert launcher.channel.recv(1, socket.MSG_PEEK) == b"W"  # the interpreter is up and waiting
        assert "_warm()" in open(f"/proc/{pid}/cmdline").read()
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
        assert status["Uid"].split()[:4] == ["65534"] * 4  # not one instruction of it as root
        assert status["Gid"].split()[:4] == ["65534"] * 4
        assert status["Groups"].split() == []  # none of root's supplementary groups
        assert status["Umask"].strip() == "0077"
        assert status["CapEff"].strip() == status["CapPrm"].strip() == "0000000000000000"
        assert f"/{slot_cgroup}/job" in open(f"/proc/{pid}/cgroup").read()
    finally:
        launcher.close()


DIES_WITH_RUNNER = """
import os, socket, sys, time
from appliance.runner import warm
from appliance.runner.execute import Launcher
if sys.argv[1] == "subprocess":
    warm.SETPRIV = None
launcher = Launcher(None)
launcher.warm(sys.executable, warm.startup_env({"PATH": "/usr/bin:/bin"}), eval(sys.argv[2]))
launcher.channel.settimeout(30)
assert launcher.channel.recv(1, socket.MSG_PEEK) == b"W"
keeper = os.fork()  # holds the runner's end of the channel: only the parent-death signal ends it
if keeper == 0:
    time.sleep(60)
    os._exit(0)
print(launcher.proc.pid, keeper, "_ctypes" in open(f"/proc/{launcher.proc.pid}/maps").read(), flush=True)
sys.stdin.read()
"""


def _ended(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["setpriv", "subprocess"])
@pytest.mark.parametrize("user", [NOBODY, None], ids=["nobody", "runners-account"])
def test_a_waiting_interpreter_dies_with_its_runner(how, user):
    """A runner killed (SIGKILL, OOM) takes its waiting interpreter with it, however that was
    started; one that setpriv started never loads _ctypes for it."""
    import signal
    import subprocess

    if user and os.geteuid() != 0:
        pytest.skip("needs root to switch accounts")
    if how == "setpriv" and warm.SETPRIV is None:
        pytest.fail("setpriv (util-linux) is missing on this box")
    runner = subprocess.Popen([sys.executable, "-c", DIES_WITH_RUNNER, how, repr(user)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid, keeper, ctypes_loaded = runner.stdout.readline().split()
        pid, keeper = int(pid), int(keeper)
        assert ctypes_loaded == str(not (user and how == "setpriv"))
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _ended(pid):
            time.sleep(0.02)
        assert _ended(pid), "the warm interpreter outlived its runner"
    finally:
        runner.kill()
        runner.wait()
        try:
            os.kill(keeper, signal.SIGKILL)
        except (NameError, ProcessLookupError):
            pass
