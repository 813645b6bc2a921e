"""execute.Launcher: a workload started through the process it prepared while the runner was
idle is indistinguishable from one forked at the time (fork fallback included)."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap

import pytest

from appliance.runner import execute
from appliance.runner.execute import Launcher, Supervision, run_workload


PROBE = """
import ctypes, json, os, signal, sys
libc = ctypes.CDLL(None)
pdeath = ctypes.c_int(0)
libc.prctl(2, ctypes.byref(pdeath), 0, 0, 0)  # PR_GET_PDEATHSIG
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ),
    "stdin": os.readlink("/proc/self/fd/0"), "ppid": os.getppid(),
    "leader": os.getpgid(0) == os.getpid() and os.getsid(0) == os.getpid(),
    "pdeathsig": pdeath.value, "sigign": status["SigIgn"].strip(),
    "sigblk": status["SigBlk"].strip(), "fds": fds[:3], "extra_fds": len(fds) - 4,
    "oom_score_adj": open("/proc/self/oom_score_adj").read().strip(),
    "cgroup": open("/proc/self/cgroup").read(),
}))
"""


def probe(tmp_path, name, launcher, slot=None, env=None):
    ws = tmp_path / name / "ws"
    ws.mkdir(parents=True)
    (ws / "probe.py").write_text(PROBE)
    out = tmp_path / name / "output"
    (tmp_path / name / "output").write_text("earlier line\n")
    env = env or {"PATH": os.defpath, "LANG": "C.UTF-8", "ODD": "a b\n'c\"", "EMPTY": ""}
    result = run_workload([sys.executable, "probe.py", "x y", ""], ws, env, out,
                          Supervision(tick_s=0.05), slot=slot, launcher=launcher)
    text = out.read_text()
    assert text.startswith("earlier line\n"), text  # appended, never truncated
    report = json.loads(text.splitlines()[1])
    report["cwd"] = os.path.relpath(report["cwd"], tmp_path / name)
    return result, report


def used(launcher: Launcher) -> bool:
    return launcher.proc is None  # launch() took the waiting process


def test_a_launched_workload_is_the_same_as_a_forked_one(tmp_path):
    launcher = Launcher(None)
    try:
        launcher.warm()
        assert launcher.proc is not None
        r1, launched = probe(tmp_path, "launched", launcher)
        assert used(launcher)
        r2, forked = probe(tmp_path, "forked", None)
    finally:
        launcher.close()
    assert r1.ok and r2.ok
    assert launched == forked
    assert launched["argv"] == ["probe.py", "x y", ""]
    assert launched["env"]["ODD"] == "a b\n'c\"" and "PYTHONUNBUFFERED" not in launched["env"]
    assert launched["stdin"] == "/dev/null" and launched["ppid"] == os.getpid()
    assert launched["leader"] and launched["pdeathsig"] == signal.SIGKILL
    assert launched["oom_score_adj"] == "1000" and launched["extra_fds"] == 0


def test_without_a_waiting_process_it_forks(tmp_path):
    launcher = Launcher(None)  # never warmed
    result, report = probe(tmp_path, "cold", launcher)
    assert result.ok and report["leader"]

    launcher.warm()
    launcher.proc.kill()  # it died while the runner was idle
    launcher.proc.wait()
    result, report = probe(tmp_path, "dead", launcher)
    assert result.ok and report["ppid"] == os.getpid() and used(launcher)
    launcher.close()


@pytest.mark.parametrize("what", ["interpreter", "cwd"])
def test_a_workload_that_cannot_start_fails_alike(tmp_path, what):
    outcomes = []
    for launcher in (Launcher(None), None):
        if launcher:
            launcher.warm()
        d = tmp_path / ("launched" if launcher else "forked")
        (d / "ws").mkdir(parents=True)
        argv = [str(d / "no-python"), "job.py"] if what == "interpreter" else [sys.executable]
        cwd = d / "ws" if what == "interpreter" else d / "no-such-dir"
        result = run_workload(argv, cwd, {"PATH": os.defpath}, d / "output",
                              Supervision(tick_s=0.05), launcher=launcher)
        text = (d / "output").read_text().replace(str(d), "D")
        outcomes.append((result.outcome, result.exit_code,
                         result.reason.replace(str(d), "D"), text))
        if launcher:
            assert used(launcher)
            launcher.close()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == execute.FAILED and "No such file or directory" in outcomes[0][2]


def test_close_ends_the_waiting_process(tmp_path):
    launcher = Launcher(None)
    launcher.warm()
    proc = launcher.proc
    launcher.warm()  # still waiting: kept
    assert launcher.proc is proc
    launcher.close()
    assert proc.returncode == 0 and launcher.proc is None
    launcher.close()  # twice is fine


def test_launched_in_a_real_slot_joins_its_job_cgroup(tmp_path, slot_cgroup):
    launcher = Launcher(slot_cgroup)
    try:
        launcher.warm()
        r1, launched = probe(tmp_path, "launched", launcher, slot=slot_cgroup)
        assert used(launcher)
        r2, forked = probe(tmp_path, "forked", None, slot=slot_cgroup)
    finally:
        launcher.close()
    assert r1.ok and r2.ok and launched == forked
    assert f"/{slot_cgroup}/job" in launched["cgroup"]


def test_out_of_memory_through_the_launcher(tmp_path, slot_cgroup):
    launcher = Launcher(slot_cgroup)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "hog.py").write_text(textwrap.dedent("""
        blocks = []
        while True:
            blocks.append(bytearray(16 * 1024 * 1024))
        """))
    try:
        launcher.warm()
        result = run_workload([sys.executable, "hog.py"], tmp_path / "ws", {"PATH": os.defpath},
                              tmp_path / "output", Supervision(tick_s=0.05), slot=slot_cgroup,
                              launcher=launcher)
        assert used(launcher)
    finally:
        launcher.close()
    assert result.outcome == execute.OUT_OF_MEMORY, result


def test_a_failed_cgroup_join_is_reported_in_the_output_alike(tmp_path, monkeypatch):
    from appliance.slot import cgroup

    def refuse(self, leaf, pid=None):
        raise PermissionError(f"no access to the {leaf} cgroup of {self.slot}")

    # the runner joins a launcher from outside, a forked child joins itself: both refused
    monkeypatch.setattr(cgroup.SlotCgroup, "join", refuse)
    texts = []
    for launcher in (Launcher("slot-x"), None):
        if launcher:
            launcher.warm()
        d = tmp_path / ("launched" if launcher else "forked")
        (d / "ws").mkdir(parents=True)
        result = run_workload([sys.executable, "-c", "print('ran')"], d / "ws",
                              {"PATH": os.defpath}, d / "output", Supervision(tick_s=0.05),
                              slot="slot-x", launcher=launcher)
        assert result.ok
        texts.append((d / "output").read_text())
        if launcher:
            assert used(launcher)
            launcher.close()
    assert texts[0] == texts[1]
    assert texts[0] == ("appliance: warning: cannot join the job cgroup of slot slot-x: "
                        "no access to the job cgroup of slot-x\nran\n")


def test_the_runner_prepares_one_while_idle_and_ends_it_when_it_stops(tmp_path):
    from appliance.paths import Home
    from appliance.runner.runner import Runner

    runner = Runner(Home.at(tmp_path / "home"), "dev", [], environ={"PATH": os.defpath})
    runner._idle(0.01)
    proc = runner.launcher.proc
    assert proc is not None and proc.poll() is None
    runner.request_stop()
    assert runner.run_forever() == 0
    assert runner.launcher.proc is None and proc.returncode is not None
