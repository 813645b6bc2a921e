"""The GPU at job time, end to end: real runners (`python -m appliance.runner`) in real slot
cgroups, real workloads, real store; only NVML is faked (tests/fake_nvml, in the runners'
processes), and the tests say which pids use how much GPU memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.runner import gpu
from appliance.runner.execute import OVER_GPU_SHARE
from appliance.runner.status import read_status
from appliance.slot import cgroup
from tests.fake_nvml.shim import fake_gpu, write_gpus
from tests.test_runner_loop import (cli, configure_store, dead_reasons, output_of, pending, request,
                                    scratch, submit, wait_for)
from tests.test_runner_loop import home as home  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parent.parent
GiB = 1 << 30
UUID = "GPU-fake-0000"


def gpu_plan(home, slots):
    """plan.json with GPU slots sharing one GPU (what `appliance status` lists)."""
    home.plan_file.parent.mkdir(parents=True, exist_ok=True)
    home.plan_file.write_text(json.dumps({"slots": [
        {"name": n, "kind": "gpu", "cpus": [0], "mems": [0], "memory_bytes": GiB, "shm_bytes": 64 << 20,
         "gpus": [UUID], "gpu_indexes": [0]} for n in slots]}))


@pytest.fixture
def gpu_box(tmp_path, cgroup_parent):
    """One fake 8 GiB GPU; returns a function that sets its processes: [(pid, bytes, sm %)]."""
    path = tmp_path / "gpus.json"

    def processes(procs=()):
        write_gpus(path, [fake_gpu(0, processes=[{"pid": p, "used_memory": m, "sm_util": u}
                                                 for p, m, u in procs])])

    processes()
    processes.path = path
    processes.parent = cgroup_parent
    return processes


def start_gpu_runner(home, slot, box, share=4 * GiB):
    """A runner in slot `slot` (a real cgroup below the test's parent) seeing the fake GPU."""
    cgroup.setup_slot(slot, sorted(os.sched_getaffinity(0))[:1], [0], GiB)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(APPLIANCE_SLOT=slot, APPLIANCE_CGROUP_PARENT=box.parent, APPLIANCE_FAKE_NVML=str(box.path),
               PYTHONPATH=f"{REPO / 'tests' / 'fake_nvml'}:{REPO}", CUDA_VISIBLE_DEVICES=UUID,
               APPLIANCE_GPU_MEMORY_BYTES=str(share))
    log = open(home.logs_dir / f"{slot}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "appliance.runner", "--home", str(home.root), "--slot", slot],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(*runners):
    for r in runners:
        r.send_signal(signal.SIGTERM)
    for r in runners:
        try:
            r.wait(60)
        finally:
            r.kill()
            r.wait()


def status(home, slot) -> dict:
    return read_status(home, slot) or {}


def result_record(store, key) -> dict:
    obj = store.client().get_object(Bucket=store.bucket, Key=f"experiments/{key}/appliance-result.json")
    return json.loads(obj["Body"].read())


def waiting_job(go: Path) -> dict:
    return {"train.py": f"""
        import os, time
        print("working", flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
        print("done", flush=True)
        """}


def test_a_job_over_its_gpu_memory_share_is_stopped_and_its_neighbour_runs_on(store, home, gpu_box):
    """Two slots share the GPU (4 GiB each of 8)."""
    configure_store(home, store, f'[runner]\npython = "{sys.executable}"\n')
    gpu_plan(home, ["slot-a", "slot-b"])
    go = scratch(home) / "go"
    keys = []
    for _ in range(2):
        key, body = request(store, waiting_job(go))
        submit(home, body)
        keys.append(key)
    a, b = start_gpu_runner(home, "slot-a", gpu_box), start_gpu_runner(home, "slot-b", gpu_box)
    try:
        pid_a = wait_for(lambda: (status(home, "slot-a").get("workload") or {}).get("pid"), "slot-a's workload")
        pid_b = wait_for(lambda: (status(home, "slot-b").get("workload") or {}).get("pid"), "slot-b's workload")
        key_a, key_b = status(home, "slot-a")["experiment"], status(home, "slot-b")["experiment"]
        # slot-a's workload takes 5 GiB of its 4 GiB share, slot-b's 1 GiB at 40% SM
        gpu_box([(pid_a, 5 * GiB, 90), (pid_b, GiB, 40)])
        last = wait_for(lambda: status(home, "slot-a").get("last_result"), "slot-a's job to be stopped")
        assert last["outcome"] == OVER_GPU_SHARE
        assert "5GiB of GPU memory on GPU-fake-0000, over the slot's share of 4GiB" in last["reason"]
        # the neighbour goes on, and `status` shows its GPU use while it runs
        st = wait_for(lambda: (status(home, "slot-b").get("gpu") or {}).get("util_mean_pct") and status(home, "slot-b"),
                      "slot-b's GPU use in its status")
        assert st["experiment"] == key_b and st["state"] == "running" and Path(f"/proc/{pid_b}").exists()
        assert st["gpu"]["peak_memory_bytes"] == GiB
        p = cli(home, "status")
        assert "gpu memory 1GiB (peak 1GiB) of a 4GiB share, mean utilisation 40%" in p.stdout, p.stdout
        go.touch()
        wait_for(lambda: status(home, "slot-b").get("last_result"), "slot-b's job to finish")
    finally:
        stop(a, b)
    assert status(home, "slot-b")["last_result"]["outcome"] == "success"
    (reason,) = dead_reasons(home)
    assert reason.startswith("GPU memory over the slot's share: the workload used 5GiB")
    assert "GPU memory over the slot's share" in output_of(store, key_a)
    assert "done" in output_of(store, key_b)
    record = result_record(store, key_b)  # what `appliance results` users get beside the output
    assert record["gpu"]["peak_memory_bytes"] == GiB and record["gpu"]["util_mean_pct"] == 40
    assert result_record(store, key_a)["gpu"]["peak_memory_bytes"] == 5 * GiB
    p = cli(home, "results", key_b, "--dest", str(home.root.parent / "res"))
    assert p.returncode == 0, p.stderr
    assert "peak 1GiB of a 4GiB share, mean utilisation 40%" in p.stdout, p.stdout


def test_a_foreign_gpu_process_holds_the_slot_back_and_gpu_leftovers_are_killed(store, home, gpu_box):
    configure_store(home, store, f'[runner]\npython = "{sys.executable}"\n')
    gpu_plan(home, ["slot-c"])
    marks = scratch(home)
    go, daemon_file = marks / "go", marks / "daemon.pid"
    foreign = subprocess.Popen(["sleep", "600"])  # someone else's process on the GPU
    gpu_box([(foreign.pid, 3 * GiB // 2, 70)])
    key, body = request(store, {"train.py": f"""
        import os, time
        if os.fork() == 0:  # a daemon that outlives the job, still holding its GPU memory
            os.setsid()
            if os.fork() == 0:
                open({str(daemon_file)!r}, "w").write(str(os.getpid()))
                time.sleep(600)
            os._exit(0)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
        print("done", flush=True)
        """})
    msgid = submit(home, body)
    runner = start_gpu_runner(home, "slot-c", gpu_box)
    try:
        held = wait_for(lambda: status(home, "slot-c").get("gpu_held"), "the slot to be held back")
        assert held["processes"] == [{"gpu": UUID, "pid": foreign.pid, "memory_bytes": 3 * GiB // 2}]
        assert pending(home) == [msgid]  # not claimed, not counted
        p = cli(home, "status")
        assert f"HELD: GPU in use by a process outside this appliance: pid {foreign.pid} (1.5GiB on {UUID})" \
            in p.stdout, p.stdout
        foreign.kill()
        foreign.wait()
        daemon = int(wait_for(lambda: daemon_file.exists() and daemon_file.read_text(), "the job's daemon"))
        assert status(home, "slot-c")["gpu_held"] is None
        gpu_box([(foreign.pid, 3 * GiB // 2, 70), (daemon, GiB // 2, 10)])  # a dead pid NVML still lists
        go.touch()
        wait_for(lambda: status(home, "slot-c").get("last_result"), "the job to finish")
    finally:
        foreign.kill()
        foreign.wait()
        stop(runner)
    assert status(home, "slot-c")["last_result"]["outcome"] == "success"
    assert not gpu._alive(daemon)
    assert f"killed GPU processes the job left running: pid {daemon} (512MiB on {UUID})" in output_of(store, key)


def test_a_gpu_slot_without_nvml_runs_its_jobs_and_says_why_they_are_unwatched(store, home):
    from tests.test_runner_loop import HELLO, fast_settings
    from appliance.queues.local import LocalQueueSource
    from appliance.runner.runner import Runner
    key, body = request(store, HELLO)
    submit(home, body)
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_FAKE_NVML"}
    runner = Runner(home, "slot-g", [LocalQueueSource(home.queue_root, runner_id="slot-g")], fast_settings(),
                    environ={**env, "CUDA_VISIBLE_DEVICES": "GPU-not-on-this-host"})
    runner.run_forever(exit_when_idle=True)
    st = status(home, "slot-g")
    assert st["last_result"]["outcome"] == "success" and "gpu" not in st["last_result"]
    assert "no GPU checks for this slot" in st["gpu_note"]
    assert "hello from the workload" in output_of(store, key)
