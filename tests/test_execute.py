"""execute.py: the workload's environment, real processes and how their end is classified."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path


from appliance.runner import execute
from appliance.runner.execute import Supervision, run_workload

PY = sys.executable


def script(tmp_path: Path, body: str) -> list[str]:
    (tmp_path / "ws").mkdir(exist_ok=True)
    (tmp_path / "ws" / "job.py").write_text(textwrap.dedent(body))
    return [PY, "job.py"]


def run(tmp_path, body, sv=None, env=None, slot=None):
    argv = script(tmp_path, body)
    out = tmp_path / "output" / "output"
    result = run_workload(argv, tmp_path / "ws", env or execute.workload_env(os.environ, {}),
                          out, sv or Supervision(tick_s=0.05), slot=slot)
    return result, out.read_text()


# ------------------------------------------------------------------ environment

def test_expand_percent_vars():
    env = {"PATH": "/usr/bin", "HOME": "/root"}
    assert execute.expand("%PATH%:./bin", env) == "/usr/bin:./bin"
    assert execute.expand("%HOME%/x%NOPE%y", env) == "/root/xy"
    assert execute.expand("100%", env) == "100%"


def test_workload_env_keeps_basics_drops_appliance_secrets():
    runner_env = {"PATH": "/usr/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_ALL": "C",
                  "AWS_SECRET_ACCESS_KEY": "s3cret", "AWS_ACCESS_KEY_ID": "ak",
                  "APPLIANCE_STORE_SECRET": "x", "PYTHONPATH": "/appliance",
                  "CUDA_VISIBLE_DEVICES": "0", "PIP_FIND_LINKS": "/w"}
    env = execute.workload_env(runner_env, {
        "AWS_DEFAULT_REGION": "us-west-2", "PATH": "%PATH%:./bin",
        "STEAL": "%AWS_SECRET_ACCESS_KEY%", "N": 3})
    assert env["PATH"] == "/usr/bin:./bin"
    assert env["AWS_DEFAULT_REGION"] == "us-west-2"  # the experiment's own setting
    assert env["STEAL"] == ""  # secrets are not there to expand
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env
    assert not any(k.startswith("APPLIANCE_") for k in env)
    assert "PYTHONPATH" not in env
    assert env["LANG"] == "C.UTF-8" and env["LC_ALL"] == "C" and env["HOME"] == "/h"
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["PIP_FIND_LINKS"] == "/w"
    assert env["N"] == "3" and env["PYTHONUNBUFFERED"] == "1"


def test_workload_sees_only_its_environment(tmp_path):
    env = execute.workload_env({"PATH": os.environ["PATH"], "AWS_SECRET_ACCESS_KEY": "s"},
                               {"GREETING": "hello %PATH%"})
    result, out = run(tmp_path, """
        import os
        print("secret" if "AWS_SECRET_ACCESS_KEY" in os.environ else "clean")
        print(os.environ["GREETING"].split()[0])
        """, env=env)
    assert result.ok, out
    assert out.split() == ["clean", "hello"]


# ------------------------------------------------------------------ outcomes

def test_success_captures_stdout_and_stderr_in_order(tmp_path):
    result, out = run(tmp_path, """
        import sys
        print("to stdout", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        print("args", sys.argv[1:])
        """)
    assert result.outcome == execute.SUCCESS and result.exit_code == 0
    assert out.splitlines() == ["to stdout", "to stderr", "args []"]


def test_output_is_appended_not_truncated(tmp_path):
    out = tmp_path / "output" / "output"
    out.parent.mkdir()
    out.write_text("from an earlier attempt\n")
    run(tmp_path, "print('second')")
    assert out.read_text() == "from an earlier attempt\nsecond\n"


def test_exit_code_is_a_failure(tmp_path):
    result, out = run(tmp_path, "import sys; print('bye'); sys.exit(3)")
    assert result.outcome == execute.FAILED and result.exit_code == 3
    assert "exit code 3" in result.reason
    assert "bye" in out and "appliance: failed: exit code 3" in out


def test_a_signal_is_named(tmp_path):
    result, _ = run(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert result.outcome == execute.FAILED
    assert "SIGSEGV" in result.reason


def test_sigkill_without_cgroup_counts_as_out_of_memory(tmp_path):
    result, out = run(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert result.outcome == execute.OUT_OF_MEMORY
    assert "SIGKILL" in result.reason and "appliance: out of memory" in out


def test_classify_uses_the_cgroup_oom_count():
    assert execute.classify(-9, None, 2, 3, "s0").outcome == execute.OUT_OF_MEMORY
    # with a cgroup that saw no OOM, a SIGKILL is just a signal
    assert execute.classify(-9, None, 2, 2, "s0").outcome == execute.FAILED
    assert execute.classify(0, None, 0, 0).ok


def test_missing_interpreter_is_a_failed_result(tmp_path):
    (tmp_path / "ws").mkdir()
    result = run_workload(["/nonexistent/python", "x.py"], tmp_path / "ws", {"PATH": "/bin"},
                          tmp_path / "out" / "output", Supervision(tick_s=0.05))
    assert result.outcome == execute.FAILED
    assert "cannot start" in (tmp_path / "out" / "output").read_text()


def test_deadline_kills_the_whole_group(tmp_path):
    marker = tmp_path / "child.pid"
    result, out = run(tmp_path, f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(marker)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(600)
        """, sv=Supervision(deadline=time.time() + 1.5, tick_s=0.05, term_grace_s=1))
    assert result.outcome == execute.TIMED_OUT
    child = int(marker.read_text())
    for _ in range(100):
        if execute.process_start_ticks(child) is None:
            break
        time.sleep(0.05)
    assert execute.process_start_ticks(child) is None, "the workload's child survived"


def test_drain_sends_sigterm_so_the_workload_can_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoint"
    stop = {"at": None}
    ready = tmp_path / "ready"

    def tick():
        if stop["at"] is None and ready.exists():
            stop["at"] = time.time()  # "SIGTERM arrived at the runner", drain timeout 0

    result, out = run(tmp_path, f"""
        import signal, sys, time
        def term(*_):
            open({str(ckpt)!r}, "w").write("saved")
            print("checkpointed", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        open({str(ready)!r}, "w").close()
        time.sleep(600)
        """, sv=Supervision(stop_at=lambda: stop["at"], tick=tick, tick_s=0.05,
                            term_grace_s=30))
    assert result.outcome == execute.INTERRUPTED
    assert ckpt.read_text() == "saved"
    assert "checkpointed" in out


def test_drain_kills_a_workload_that_ignores_sigterm(tmp_path):
    ready = tmp_path / "ready"
    result, _ = run(tmp_path, f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(ready)!r}, "w").close()
        time.sleep(600)
        """, sv=Supervision(stop_at=lambda: time.time() if ready.exists() else None,
                            tick_s=0.05, term_grace_s=0.5))
    assert result.outcome == execute.INTERRUPTED


def test_periodic_save_and_ticks_are_called(tmp_path):
    calls = {"save": 0, "tick": 0}
    result, _ = run(tmp_path, "import time; time.sleep(1)", sv=Supervision(
        save_every_s=0.1, save=lambda: calls.__setitem__("save", calls["save"] + 1),
        tick=lambda: calls.__setitem__("tick", calls["tick"] + 1), tick_s=0.05))
    assert result.ok
    assert calls["save"] >= 1 and calls["tick"] >= 1


def test_kill_leftover_needs_the_same_process(tmp_path):
    import subprocess
    p = subprocess.Popen([PY, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        ticks = execute.process_start_ticks(p.pid)
        assert not execute.kill_leftover({"pid": p.pid, "start_ticks": ticks + 1})
        assert p.poll() is None
        assert execute.kill_leftover({"pid": p.pid, "start_ticks": ticks})
        assert p.wait(10) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()


# ------------------------------------------------------------------ real OOM in a slot cgroup

def test_real_oom_in_the_slot_fails_the_job_not_the_runner(tmp_path, slot_cgroup):
    result, out = run(tmp_path, """
        print("allocating", flush=True)
        blocks = []
        while True:
            blocks.append(bytearray(16 * 1024 * 1024))
        """, slot=slot_cgroup)
    assert result.outcome == execute.OUT_OF_MEMORY, (result, out)
    assert "memory limit of slot slot-oom" in result.reason
    assert "allocating" in out
    # the runner (this process) is alive and can run the next job in the same slot
    result, out = run(tmp_path, "print('next')", slot=slot_cgroup)
    assert result.ok and out.endswith("next\n")


def test_a_slot_without_a_job_cgroup_runs_without_one(tmp_path):
    """The docker backend sets APPLIANCE_SLOT but the container is the slot: no cgroup moves,
    and a SIGKILL still reads as out of memory."""
    assert execute.job_cgroup("slot-not-here") is None
    assert execute.job_cgroup(None) is None


def test_job_cgroup_is_found_for_a_real_slot(slot_cgroup):
    assert execute.job_cgroup(slot_cgroup) == slot_cgroup


def test_the_workload_is_the_first_choice_of_the_oom_killer(tmp_path):
    result, output = run(tmp_path, """
        print("adj", open("/proc/self/oom_score_adj").read().strip())
    """)
    assert result.ok, output
    assert "adj 1000" in output


def test_in_a_container_its_own_cgroup_counts_the_oom_kills(tmp_path, monkeypatch):
    kills = iter([3, 4])
    monkeypatch.setattr(execute, "container_oom_kills", lambda: next(kills))
    argv = script(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n")
    result = run_workload(argv, tmp_path / "ws", execute.workload_env(os.environ, {}),
                          tmp_path / "out", Supervision(tick_s=0.05), container_slot="slot-3")
    assert result.outcome == execute.OUT_OF_MEMORY
    assert "memory limit of slot slot-3" in result.reason


# ------------------------------------------------------------------ ram without a job cgroup


def test_without_a_job_cgroup_the_requests_ram_is_watched(tmp_path):
    # the docker backend's case: no cgroup of the job's own, so the runner looks every tick
    body = """
        import time
        b = bytearray(300 << 20)
        for i in range(0, len(b), 4096):
            b[i] = 1
        time.sleep(3)
        print("survived")
    """
    argv = script(tmp_path, body)
    out = tmp_path / "output" / "output"
    result = run_workload(argv, tmp_path / "ws", execute.workload_env(os.environ, {}), out,
                          Supervision(tick_s=0.05), ram_bytes=128 << 20)
    assert result.outcome == execute.OUT_OF_MEMORY, result
    assert "ram, 128 MiB" in result.reason
    assert "survived" not in out.read_text()
    assert result.usage["peak_memory_bytes"] > 128 << 20
    # under its ram it runs as before, and its peak is its own high-water mark
    launcher = execute.Launcher(None)
    launcher.warm()
    try:
        result = run_workload([PY, "-c", "print('hi')"], tmp_path / "ws", execute.workload_env(os.environ, {}), out,
                              Supervision(tick_s=0.05), ram_bytes=128 << 20, launcher=launcher)
    finally:
        launcher.close()
    assert result.ok and out.read_text().endswith("hi\n")
    assert result.usage["peak_memory_bytes"] < 20 << 20
