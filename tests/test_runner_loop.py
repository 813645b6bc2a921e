"""The runner loop end to end: local queue -> real SeaweedFS -> real workload processes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from appliance.paths import Home
from appliance.queues.local import CLAIMED, DEAD, LocalQueueSource
from appliance.studioml.transfer import RetryPolicy
from appliance.runner.runner import Runner, RunnerSettings
from appliance.runner.status import find_experiment, read_status
from tests.realparts import free_port
from tests.wheels import make_wheel, offline_env

REPO = Path(__file__).resolve().parent.parent
Q = "local_test"
MUTABLE = ("modeldir", "retval", "output", "tb", "_metrics", "_metadata")


# ------------------------------------------------------------------ helpers

def workspace_tar(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            data = textwrap.dedent(text).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def request(store, files: dict[str, str], args=(), key=None, secret=None, endpoint=None,
            pythonenv=("studioml==0.0.49",), ram="1gb", save="3m", lifetime="30m",
            max_duration=None, pip=()):
    """A request shaped like the real fixture, pointing at the test store."""
    key = key or f"exp-{uuid.uuid4().hex[:12]}"
    host = (endpoint or store.endpoint_url).split("://", 1)[1]
    blob = f"blobstore/{uuid.uuid4().hex}.tar"
    if endpoint is None:
        store.client().put_object(Bucket=store.bucket, Key=blob, Body=workspace_tar(files))
    creds = {"aws": {"access_key": store.access_key,
                     "secret_access_key": secret or store.secret_key, "region": "us-east-1"}}

    def art(name, k, mutable):
        return {"unpack": True, "mutable": mutable, "key": k, "local": f"/home/user/{name}",
                "qualified": f"s3://{host}/{store.bucket}/{k}", "bucket": store.bucket,
                "credentials": creds}

    artifacts = {"workspace": art("workspace", blob, False)}
    for n in MUTABLE:
        artifacts[n] = art(n, f"experiments/{key}/{n}.tar", True)
    body = {
        "experiment": {"key": key, "args": list(args), "filename": "train.py",
                       "pythonenv": list(pythonenv), "pythonver": "3.11",
                       "resources_needed": {"gpus": 0, "cpus": 1, "ram": ram, "hdd": "1gb",
                                            "gpuMem": "0gb"},
                       "status": "waiting", "time_added": time.time(),
                       "max_duration": max_duration, "artifacts": artifacts},
        "config": {"saveWorkspaceFrequency": save, "experimentLifetime": lifetime,
                   "env": {"PATH": "%PATH%:./bin", "GREETING": "hello"}, "pip": list(pip)},
    }
    return key, json.dumps(body).encode()


def read_artifact(store, key, name, member=None) -> dict[str, bytes]:
    obj = store.client().get_object(Bucket=store.bucket, Key=f"experiments/{key}/{name}.tar")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(obj["Body"].read()), mode="r:*") as tar:
        for m in tar.getmembers():
            if m.isfile():
                out[m.name] = tar.extractfile(m).read()
    return out


def output_of(store, key) -> str:
    return read_artifact(store, key, "output")["output"].decode()


@pytest.fixture
def home(tmp_path) -> Home:
    h = Home.at(tmp_path / "home")
    h.ensure()
    return h


def scratch(home) -> Path:
    """A folder workloads may write to (they run as an unprivileged slot account, and the home is
    root's): for test scripts that leave marks outside their job."""
    d = home.root.parent / "scratch"
    d.mkdir(exist_ok=True)
    d.chmod(0o1777)
    return d


def fast_settings(**kw) -> RunnerSettings:
    base = dict(python=sys.executable, idle_wait_s=0.2, tick_s=0.05, term_grace_s=2,
                retry=RetryPolicy(attempts=2, first_delay_s=0.01, max_delay_s=0.01))
    base.update(kw)
    return RunnerSettings(**base)


def make_runner(home, slot="slot-0", **kw) -> tuple[Runner, LocalQueueSource]:
    src = LocalQueueSource(home.queue_root, runner_id=slot)
    return Runner(home, slot, [src], fast_settings(**kw), environ=dict(os.environ)), src


def submit(home, body, queue=Q) -> str:
    writer = LocalQueueSource(home.queue_root, runner_id="client")
    try:
        return writer.enqueue(queue, body)
    finally:
        writer.close()


def dead_reasons(home, queue=Q) -> list[str]:
    d = home.queue_root / DEAD / queue
    return [p.read_text() for p in sorted(d.glob("*.reason"))] if d.is_dir() else []


def pending(home, queue=Q) -> list[str]:
    d = home.queue_root / queue
    return [p.name for p in d.iterdir() if not p.name.startswith(".")
            and p.name != "lock.lock"] if d.is_dir() else []


def claimed(home, queue=Q) -> list:
    d = home.queue_root / CLAIMED / queue
    return list(d.iterdir()) if d.is_dir() else []


HELLO = {"train.py": """
    import os, sys
    print("hello from the workload", sys.argv[1:], flush=True)
    print(os.environ["GREETING"], "on stderr", file=sys.stderr, flush=True)
    with open(os.path.join("..", "modeldir", "model.txt"), "w") as f:
        f.write("trained")
    """}


# ------------------------------------------------------------------ the happy path

def test_experiment_runs_and_its_output_lands_in_the_store(store, home):
    key, body = request(store, HELLO, args=["--lr", "0.1"])
    submit(home, body)
    runner, _ = make_runner(home)
    assert runner.run_forever(exit_when_idle=True) == 0
    out = output_of(store, key)
    assert "hello from the workload ['--lr', '0.1']" in out
    assert "hello on stderr" in out
    assert read_artifact(store, key, "modeldir") == {"model.txt": b"trained"}
    assert pending(home) == [] and claimed(home) == [] and dead_reasons(home) == []
    st = read_status(home, "slot-0")
    assert st["state"] == "stopped"
    assert st["last_result"]["experiment"] == key
    assert st["last_result"]["outcome"] == "success"
    rec = find_experiment(home, key)
    assert rec["artifacts"]["output"]["key"] == f"experiments/{key}/output.tar"
    assert "secret" not in json.dumps(rec).lower()
    assert list((home.work_dir / "slot-0").iterdir()) == []  # job directory cleaned up


def test_runner_process_builds_a_venv_and_runs_the_experiment(store, home):
    """`python -m appliance.runner` as supervisord starts it, venv built from pythonenv."""
    key, body = request(store, {"train.py": """
        import sys
        print("interpreter", sys.prefix)
        """})
    submit(home, body)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    p = subprocess.run([sys.executable, "-m", "appliance.runner", "--home", str(home.root),
                        "--slot", "slot-1", "--exit-when-idle"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    out = output_of(store, key)
    assert f"interpreter {home.venv_cache}" in out, (out, p.stderr)
    assert pending(home) == [] and dead_reasons(home) == []


def test_round_robin_over_queues(store, home):
    order = scratch(home) / "order.txt"
    script = {"train.py": f"""
        import sys
        open({str(order)!r}, "a").write(sys.argv[1] + "\\n")
        """}
    for q in ("local_a", "local_b"):
        for i in range(2):
            submit(home, request(store, script, args=[f"{q}{i}"])[1], queue=q)
            time.sleep(0.01)  # distinct mtimes keep each queue FIFO
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    assert order.read_text().split() == ["local_a0", "local_b0", "local_a1", "local_b1"]


def test_second_experiment_with_the_same_pythonenv_starts_much_faster(store, home):
    """Figures for the issue: claim -> workload start, venv built vs reused."""
    started = scratch(home) / "started"
    script = {"train.py": f"""
        import time
        open({str(started)!r}, "w").write(repr(time.time()))
        """}
    runner, _ = make_runner(home, python="")
    times = []
    for _ in range(2):
        submit(home, request(store, script, pythonenv=["six==1.17.0", "studioml==0.0.49"])[1])
        t0 = time.time()
        assert runner.run_once()
        times.append(float(started.read_text()) - t0)
    print(f"\nclaim -> workload start: first {times[0]:.2f}s (venv built), "
          f"second {times[1]:.3f}s (venv reused): {times[0] / times[1]:.0f}x")
    assert runner.status.data["last_result"]["outcome"] == "success"
    assert len(runner.venvs.entries()) == 1


# ------------------------------------------------------------------ bad input

def test_bad_request_is_dead_lettered_and_the_runner_goes_on(store, home):
    submit(home, b'{"experiment": {"key": "x"}}')
    key, body = request(store, HELLO)
    submit(home, body)
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    reasons = dead_reasons(home)
    assert len(reasons) == 1 and reasons[0].startswith("bad request: experiment.filename")
    assert "hello from the workload" in output_of(store, key)


def test_wrong_credentials_dead_letter_with_a_clear_reason(store, home):
    key, body = request(store, HELLO, secret="not-the-secret")
    submit(home, body)
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    (reason,) = dead_reasons(home)
    assert "artifact 'workspace'" in reason and store.endpoint_url in reason
    assert "credentials" in reason
    st = read_status(home, "slot-0")["last_result"]
    assert st["outcome"] == "failed" and "credentials" in st["reason"]


def test_store_down_puts_the_message_back(store, home):
    store_url = f"http://127.0.0.1:{free_port()}"
    key, body = request(store, HELLO, endpoint=store_url)
    msgid = submit(home, body)
    runner, _ = make_runner(home)
    assert runner.run_once()
    assert pending(home) == [msgid] and claimed(home) == [] and dead_reasons(home) == []
    st = runner.status.data["last_result"]
    assert st["outcome"] == "released" and "store unavailable" in st["reason"]
    assert runner.store_health.paused_until[store_url] > time.time()  # and it does not hammer that store


def test_failing_workload_is_dead_lettered_with_its_output_uploaded(store, home):
    key, body = request(store, {"train.py": """
        import sys
        print("about to fail", flush=True)
        raise SystemExit(3)
        """})
    submit(home, body)
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    assert dead_reasons(home) == ["failed: exit code 3 [class: user]\n"]
    assert runner.status.data["last_result"]["class"] == "user"
    out = output_of(store, key)
    assert "about to fail" in out and "exit code 3" in out


def test_hostile_workspace_is_refused(store, home):
    key = f"exp-{uuid.uuid4().hex[:8]}"
    key, body = request(store, {"../../../evil.py": "print('x')"}, key=key)
    submit(home, body)
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    (reason,) = dead_reasons(home)
    assert "unsafe" in reason
    assert not (home.work_dir.parent / "evil.py").exists()


def test_out_of_memory_fails_the_job_not_the_runner(store, home):
    # no slot cgroup here: the workload SIGKILLs itself the way the OOM killer would
    key, body = request(store, {"train.py": """
        import os, signal
        print("allocating", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """})
    submit(home, body)
    key2, body2 = request(store, HELLO)
    submit(home, body2)
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    (reason,) = dead_reasons(home)
    assert "out of memory" in reason
    assert "out of memory" in output_of(store, key)
    assert "hello from the workload" in output_of(store, key2)


def test_real_oom_in_a_slot_cgroup_fails_only_that_job(store, home, slot_cgroup):
    """The runner is in slot `slot_cgroup` (APPLIANCE_SLOT): workloads join its 64 MiB job
    cgroup; one that eats memory is OOM-killed there, the runner goes on with the next."""
    key, body = request(store, {"train.py": """
        print("allocating", flush=True)
        hog = []
        while True:
            hog.append(bytearray(16 << 20))
        """})
    submit(home, body)
    key2, body2 = request(store, HELLO)
    submit(home, body2)
    src = LocalQueueSource(home.queue_root, runner_id="slot-oom")
    runner = Runner(home, "slot-oom", [src], fast_settings(),
                    environ={**os.environ, "APPLIANCE_SLOT": slot_cgroup})
    runner.run_forever(exit_when_idle=True)
    (reason,) = dead_reasons(home)
    assert reason.startswith("out of memory: the workload exceeded the memory limit of slot "
                             "slot-oom")
    assert "allocating" in output_of(store, key)
    assert "hello from the workload" in output_of(store, key2)


def test_pip_failure_fails_the_experiment_with_pips_error(store, home):
    key, body = request(store, HELLO, pythonenv=["appliance-no-such-package-0xdead==1.0"])
    submit(home, body)
    runner, _ = make_runner(home, python="")
    runner.run_forever(exit_when_idle=True)
    (reason,) = dead_reasons(home)
    assert reason.startswith("environment failed")
    assert "appliance-no-such-package-0xdead" in output_of(store, key)
    assert "appliance-no-such-package-0xdead" in reason  # the installer's error, in the reason


def test_the_jobs_log_and_status_show_the_environment_build(store, home):
    key, body = request(store, HELLO, pythonenv=["six==1.17.0", "packaging==24.0"])
    submit(home, body)
    runner, _ = make_runner(home, python="")
    steps, update = [], runner.status.update

    def recorded(**fields):  # what the status file said, every time it was written
        update(**fields)
        steps.append(runner.status.data.get("step"))

    runner.status.update = recorded
    runner.run_forever(exit_when_idle=True)
    out = output_of(store, key)
    assert "appliance: env: resolving: six==1.17.0" in out, out
    assert "appliance: env: downloading packaging-24.0-py3-none-any.whl" in out, out
    assert "hello from the workload" in out
    assert "building env (2/2)" in steps, sorted(set(map(str, steps)))
    assert runner.status.data.get("step") is None


def test_lifetime_is_enforced(store, home):
    key, body = request(store, {"train.py": "import time; print('long', flush=True); time.sleep(600)"},
                        max_duration="1s")
    submit(home, body)
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    (reason,) = dead_reasons(home)
    assert reason.startswith("timed out")
    assert "long" in output_of(store, key)


def _plan(home, slots):
    home.plan_file.parent.mkdir(parents=True, exist_ok=True)
    home.plan_file.write_text(json.dumps({"slots": [
        {"name": n, "kind": "cpu", "cpus": list(range(c)), "mems": [0], "memory_bytes": m,
         "shm_bytes": m // 4, "gpus": [], "gpu_indexes": []} for n, c, m in slots]}))


def test_a_request_no_slot_can_run_is_dead_lettered(store, home):
    _plan(home, [("slot-0", 1, 1 << 30), ("slot-1", 1, 2 << 30)])
    submit(home, request(store, HELLO, ram="64gb")[1])
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    (reason,) = dead_reasons(home)
    assert reason.startswith("no slot of this appliance can run it: needs 64 GiB ram")


def test_a_request_for_a_bigger_slot_is_left_for_it(store, home):
    _plan(home, [("slot-0", 1, 1 << 30), ("slot-big", 1, 8 << 30)])
    msgid = submit(home, request(store, HELLO, ram="4gb")[1])
    key, body = request(store, HELLO, ram="512mb")
    submit(home, body)
    runner, _ = make_runner(home)
    assert runner.run_once()  # skips the big one, runs the small one
    assert "hello from the workload" in output_of(store, key)
    assert pending(home) == [msgid] and dead_reasons(home) == []
    assert not runner.run_once()
    assert pending(home) == [msgid]


# ------------------------------------------------------------------ drain and crashes

def start_runner(home, slot, extra_toml=""):
    home.config_file.write_text(f'[runner]\npython = "{sys.executable}"\n{extra_toml}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    log = open(home.logs_dir / f"{slot}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "appliance.runner", "--home",
                             str(home.root), "--slot", slot], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_for(cond, what, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_drains_checkpoints_uploads_and_releases(store, home):
    key, body = request(store, {"train.py": """
        import os, signal, sys, time
        def stop(*_):
            open(os.path.join("..", "modeldir", "ckpt"), "w").write("step 7")
            print("checkpointed", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("working", flush=True)
        time.sleep(600)
        """})
    msgid = submit(home, body)
    runner = start_runner(home, "slot-d", 'drain_timeout = "1s"\n')
    try:
        wait_for(lambda: (read_status(home, "slot-d") or {}).get("workload"), "the workload")
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(60) == 0
    finally:
        runner.kill()
        runner.wait()
    assert pending(home) == [msgid] and claimed(home) == []  # runs again later
    assert read_artifact(store, key, "modeldir") == {"ckpt": b"step 7"}
    assert "checkpointed" in output_of(store, key)
    st = read_status(home, "slot-d")
    assert st["state"] == "stopped" and st["last_result"]["outcome"] == "interrupted"


def test_idle_runner_stops_at_once_on_sigterm(home):
    runner = start_runner(home, "slot-i")
    try:
        wait_for(lambda: (read_status(home, "slot-i") or {}).get("state") == "idle", "idle")
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(30) == 0
    finally:
        runner.kill()
        runner.wait()


def test_sigkill_of_the_runner_mid_job_runs_the_job_again(store, home):
    marker = scratch(home) / "first-attempt"
    key, body = request(store, {"train.py": f"""
        import os, time
        if os.path.exists({str(marker)!r}):
            print("second attempt completes", flush=True)
        else:
            open({str(marker)!r}, "w").close()
            print("first attempt", flush=True)
            time.sleep(600)
        """}, save="1s")
    submit(home, body)
    first = start_runner(home, "slot-k")
    try:
        st = wait_for(lambda: (read_status(home, "slot-k") or {}).get("last_upload")
                      and read_status(home, "slot-k"), "a periodic upload")
        workload = st["workload"]["pid"]
        first.kill()  # SIGKILL
        first.wait()
        wait_for(lambda: not Path(f"/proc/{workload}").exists(), "the orphaned workload to die")
    finally:
        first.kill()
        first.wait()
    second = start_runner(home, "slot-k")
    try:
        wait_for(lambda: (read_status(home, "slot-k") or {}).get("last_result"), "the rerun")
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        second.kill()
        second.wait()
    assert read_status(home, "slot-k")["last_result"]["outcome"] == "success"
    out = output_of(store, key)
    assert "first attempt" in out and "running again" in out
    body, footer = out.rstrip().rsplit("\n", 1)  # the last line is the appliance's report
    assert body.endswith("second attempt completes") and footer.startswith("appliance: success: class success")
    assert pending(home) == [] and claimed(home) == [] and dead_reasons(home) == []


# ------------------------------------------------------------------ appliance logs / results

def configure_store(home, store, extra=""):
    """Point `home` at the test store: its port, bucket and credentials."""
    import shutil
    from urllib.parse import urlsplit
    port = urlsplit(store.endpoint_url).port
    home.config_file.write_text(f'[object_store]\nport = {port}\nbucket = "{store.bucket}"\n'
                                f'{extra}')
    home.secrets_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(store.home.store_credentials, home.store_credentials)


def cli(home, *argv) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    return subprocess.run([sys.executable, "-m", "appliance", "--home", str(home.root), *argv],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_logs_and_results_of_a_finished_experiment(store, home, tmp_path):
    configure_store(home, store)
    key, body = request(store, HELLO)
    submit(home, body)
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    p = cli(home, "logs", key)
    assert p.returncode == 0, p.stderr
    assert "hello from the workload" in p.stdout and "hello on stderr" in p.stdout
    p = cli(home, "results", key, "--dest", str(tmp_path / "res"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "res" / "modeldir" / "model.txt").read_text() == "trained"
    assert "hello from the workload" in (tmp_path / "res" / "output" / "output").read_text()
    assert not (tmp_path / "res" / "tb").exists()  # never written, never uploaded
    p = cli(home, "logs", "no-such-experiment")
    assert p.returncode == 1 and "no output" in p.stderr


def test_logs_follow_a_running_experiment(store, home):
    go = scratch(home) / "go"
    key, body = request(store, {"train.py": f"""
        import os, time
        print("first line", flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
        print("last line", flush=True)
        """})
    submit(home, body)
    runner = start_runner(home, "slot-f")
    configure_store(home, store, f'[runner]\npython = "{sys.executable}"\n')
    try:
        wait_for(lambda: (read_status(home, "slot-f") or {}).get("workload"), "the workload")
        wait_for(lambda: "first line" in cli(home, "logs", key).stdout, "live output")
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        follower = subprocess.Popen([sys.executable, "-m", "appliance", "--home",
                                     str(home.root), "logs", "-f", key], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        go.touch()
        out, _ = follower.communicate(timeout=60)
        assert follower.returncode == 0
        assert out.index("first line") < out.index("last line")
    finally:
        runner.send_signal(signal.SIGTERM)
        try:
            runner.wait(60)
        finally:
            runner.kill()
            runner.wait()


def test_the_hello_example_runs(store, home):
    files = {"train.py": (REPO / "examples" / "hello" / "train.py").read_text()}
    key, body = request(store, files, args=["--steps", "3", "--sleep", "0"])
    submit(home, body)
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    out = output_of(store, key)
    assert f"hello from experiment {key}" in out and "\ndone\nappliance: success: class success" in out
    assert json.loads(read_artifact(store, key, "modeldir")["checkpoint.json"])["step"] == 3
    assert "w" in json.loads(read_artifact(store, key, "retval")["retval.json"])


def test_runner_under_the_slot_exec_wrapper_survives_an_oom_and_runs_on(store, home,
                                                                        slot_cgroup):
    """The real chain: exec wrapper (cgroup, affinity, /dev/shm) -> runner -> workloads in the
    slot's job cgroup. The memory hog is OOM-killed inside the slot; the runner (same pid all
    along) runs the next experiment."""
    from appliance.slot import cgroup
    key, body = request(store, {"train.py": """
        hog = []
        print("allocating", flush=True)
        while True:
            hog.append(bytearray(16 << 20))
        """}, ram="128mb")
    submit(home, body)
    key2, body2 = request(store, HELLO, ram="128mb")
    submit(home, body2)
    home.config_file.write_text(f'[runner]\npython = "{sys.executable}"\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("APPLIANCE_") or k == cgroup.PARENT_ENV}
    cpu = sorted(os.sched_getaffinity(0))[0]
    log = open(home.logs_dir / "slot-oom.log", "ab")
    runner = subprocess.Popen(
        [sys.executable, "-m", "appliance.slot.exec", "--slot", slot_cgroup, "--cpus", str(cpu),
         "--mems", "0", "--memory-bytes", str(400 << 20), "--shm-bytes", str(16 << 20), "--",
         sys.executable, "-m", "appliance.runner", "--home", str(home.root), "--slot",
         slot_cgroup, "--exit-when-idle"], cwd=REPO, env=env, stdout=log,
        stderr=subprocess.STDOUT)
    try:
        assert runner.wait(300) == 0, (home.logs_dir / "slot-oom.log").read_text()[-3000:]
    finally:
        runner.kill()
        runner.wait()
    (reason,) = dead_reasons(home)
    # its ram (128mb) is its limit, below the slot's 400 MiB
    assert reason.startswith("out of memory: the workload exceeded its memory limit (the request's ram, 128 MiB)")
    assert "allocating" in output_of(store, key)
    assert "hello from the workload" in output_of(store, key2)
    assert read_status(home, slot_cgroup)["last_result"]["outcome"] == "success"


# ------------------------------------------------------------------ failure classes and retries

def test_an_infrastructure_failure_runs_again_then_is_dead_lettered_as_infrastructure(store, home, monkeypatch):
    # pip cannot reach its index (a dead endpoint): the box's fault, not the request's
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "1")  # pip says "Connection refused" only when it retries
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_CONFIG_FILE", raising=False)
    key, body = request(store, HELLO, pythonenv=[f"appliance-retry-probe-{uuid.uuid4().hex[:6]}==1.0"])
    msgid = submit(home, body)
    runner, _ = make_runner(home, python="", retries=1, retry_backoff_s=0.1, max_attempts=3)
    assert runner.run_once()
    last = runner.status.data["last_result"]
    assert last["class"] == "infrastructure" and last["retry"] == 1
    assert pending(home) == [msgid] and dead_reasons(home) == []  # back in the queue, counted
    runner.run_forever(exit_when_idle=True)
    (reason,) = dead_reasons(home)
    assert reason.startswith("environment failed") and reason.rstrip().endswith("[class: infrastructure]")
    assert "running it again (retry 1 of 1)" in output_of(store, key)


def test_an_unresolvable_requirement_is_class_environment_and_not_retried(store, home):
    key, body = request(store, HELLO, pythonenv=["appliance-no-such-package-0xdead==1.0"])
    submit(home, body)
    runner, _ = make_runner(home, python="", retries=2)
    assert runner.run_once()
    (reason,) = dead_reasons(home)
    assert reason.rstrip().endswith("[class: environment]")
    assert runner.status.data["last_result"]["class"] == "environment"


@pytest.mark.parametrize("pythonenv", [["appliance-no-such-package==1.0"], ["demo==1.0", "demo==2.0"]],
                         ids=["unknown", "conflict"])
def test_a_set_the_index_cannot_resolve_is_class_environment_and_runs_once(store, home, monkeypatch,
                                                                           tmp_path, pythonenv):
    wheels = tmp_path / "wheels"  # the index: a folder of wheels (uv, then pip, see only it)
    for version in ("1.0", "2.0"):
        make_wheel(wheels, "demo", version, {"demo.py": f"VERSION = {version!r}\n"})
    for name, value in offline_env(wheels).items():
        if name != "PATH":
            monkeypatch.setenv(name, value)
    key, body = request(store, HELLO, pythonenv=pythonenv)
    submit(home, body)
    runner, _ = make_runner(home, python="", retries=2)
    assert runner.run_once()
    (reason,) = dead_reasons(home)
    assert reason.startswith("environment failed") and reason.rstrip().endswith("[class: environment]"), reason
    assert "demo" in reason or "appliance-no-such-package" in reason
    last = runner.status.data["last_result"]
    assert last["class"] == "environment" and not last.get("retry") and pending(home) == []


def test_classes_and_the_job_report_in_a_real_slot(store, home, slot_cgroup):
    """In a real slot cgroup: a busy job reports its CPU seconds and peak memory; one exiting 1
    is class user and not retried; one eating memory is class oom; one that sleeps without
    output is stopped after runner.hang_after as class hung."""
    jobs = {
        "busy": {"train.py": """
            import time
            block = bytearray(24 << 20)
            end = time.process_time() + 0.5
            while time.process_time() < end:
                pass
            print("done", len(block), flush=True)
            """},
        "user": {"train.py": "raise SystemExit(1)\n"},
        "oom": {"train.py": """
            hog = []
            while True:
                hog.append(bytearray(16 << 20))
            """},
        "hung": {"train.py": """
            import time
            print("waiting for nothing", flush=True)
            time.sleep(600)
            """},
    }
    src = LocalQueueSource(home.queue_root, runner_id="slot-oom")
    runner = Runner(home, "slot-oom", [src], fast_settings(hang_after_s=2.0, retries=2),
                    environ={**os.environ, "APPLIANCE_SLOT": slot_cgroup, "APPLIANCE_SLOT_CPUS": "0"})
    last = {}
    keys = {}
    for name, files in jobs.items():
        keys[name], body = request(store, files)
        submit(home, body)
        assert runner.run_once()
        last[name] = runner.status.data["last_result"]
    assert [last[n]["class"] for n in jobs] == ["success", "user", "oom", "hung"]
    report = last["busy"]["report"]
    assert report["cpu_seconds"] >= 0.4 and report["peak_memory_bytes"] >= 24 << 20
    assert report["slot"] == "slot-oom" and report["cpus"] == "0" and report["wall_seconds"] > 0
    assert "class success, cpu " in output_of(store, keys["busy"])  # the footer `appliance logs` shows
    assert "class hung" in output_of(store, keys["hung"])
    reasons = dead_reasons(home)
    assert sorted(r.rstrip().rsplit("[class: ", 1)[1] for r in reasons) == ["hung]", "oom]", "user]"]
    assert pending(home) == [] and claimed(home) == []  # none of them runs again
