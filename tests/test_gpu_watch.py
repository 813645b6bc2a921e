"""The GPU watch (appliance/gpu_sampling.py) and the runner's GPU rules (appliance/runner/gpu.py)
against the fake NVML (tests/fake_nvml), real processes for who owns a pid."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pynvml
import pytest

from appliance.gpu_sampling import GpuWatch, visible_devices
from appliance.runner import gpu
from tests.fake_nvml import shim

GiB = 1 << 30


@pytest.fixture
def nvml(tmp_path):
    """The fake NVML in this process (pynvml's own functions back afterwards); returns a function
    that describes the box: write(gpus)."""
    saved = {k: v for k, v in vars(pynvml).items() if k.startswith("nvml")}
    path = tmp_path / "gpus.json"
    shim.install(path)
    yield lambda gpus: shim.write_gpus(path, gpus)
    for k, v in saved.items():
        setattr(pynvml, k, v)


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def test_a_slot_without_gpus_asks_nvml_nothing(nvml):
    watch = GpuWatch(visible_devices(""))  # the fake has no file yet: any NVML call would fail
    assert not watch.active and watch.problem == "" and watch.processes() == []
    assert visible_devices("-1") == [] and visible_devices("GPU-a, GPU-b") == ["GPU-a", "GPU-b"]


def test_no_driver_is_a_note_not_a_failure(nvml):
    watch = GpuWatch(["GPU-fake-0000"])  # no description file: no driver
    assert not watch.active and "NVML unavailable" in watch.problem
    assert watch.processes() == [] and watch.samples() == []


def test_processes_and_their_memory_are_live(nvml):
    nvml([shim.fake_gpu(0), shim.fake_gpu(1)])
    watch = GpuWatch(["GPU-fake-0001"])
    assert [d.uuid for d in watch.devices] == ["GPU-fake-0001"] and watch.devices[0].total_bytes == 8 * GiB
    assert watch.processes() == [] and watch.samples() == []  # NOT_FOUND: no samples
    nvml([shim.fake_gpu(0, processes=[{"pid": 7, "used_memory": GiB}]),
          shim.fake_gpu(1, processes=[{"pid": 11, "used_memory": 3 * GiB, "sm_util": 40},
                                      {"pid": 12, "used_memory": None}])])
    procs = watch.processes()  # the same watch: NVML is not opened again
    assert [(p.gpu, p.pid, p.memory_bytes) for p in procs] == [
        ("GPU-fake-0001", 11, 3 * GiB), ("GPU-fake-0001", 12, None)]
    samples = watch.samples()
    assert sorted((s.pid, s.sm_pct) for s in samples) == [(11, 40), (12, 0)]
    watch.close()


def test_a_missing_gpu_is_named(nvml):
    nvml([shim.fake_gpu(0)])
    watch = GpuWatch(["GPU-gone"])
    assert not watch.active and "GPU-gone" in watch.problem


def test_who_owns_a_pid_without_cgroups(child):
    members = gpu.Membership(None)
    assert members.owner(child.pid) == gpu.JOB  # the runner's child
    assert members.owner(1) == gpu.FOREIGN
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert members.owner(dead.pid) is None


def test_a_job_over_its_share_is_told_so_and_accounted(nvml, child):
    nvml([shim.fake_gpu(0, processes=[{"pid": child.pid, "used_memory": 3 * GiB, "sm_util": 30},
                                      {"pid": 1, "used_memory": 4 * GiB, "sm_util": 90}])])
    slot = gpu.SlotGpus(GpuWatch(["GPU-fake-0000"]), gpu.Membership(None), {gpu.SHARE_ENV: str(2 * GiB)})
    assert slot.share == {"GPU-fake-0000": 2 * GiB}
    assert [p.pid for p in slot.foreign()] == [1]
    job = gpu.JobGpu(slot, every_s=0)
    reason = job.look()
    assert "3GiB of GPU memory on GPU-fake-0000, over the slot's share of 2GiB" in reason
    summary = job.summary()
    assert summary["peak_memory_bytes"] == 3 * GiB and summary["share_bytes"] == 2 * GiB
    assert summary["util_mean_pct"] == 30  # its own process only, not pid 1's


def test_within_the_share_nothing_happens_and_no_share_means_the_card(nvml, child):
    nvml([shim.fake_gpu(0, processes=[{"pid": child.pid, "used_memory": 5 * GiB}])])
    slot = gpu.SlotGpus(GpuWatch(["GPU-fake-0000"]), gpu.Membership(None), {})
    assert slot.share == {"GPU-fake-0000": 8 * GiB} and slot.env == {}  # whole card: no knob
    job = gpu.JobGpu(slot, every_s=0)
    assert job.look() is None and job.summary()["peak_memory_bytes"] == 5 * GiB


def test_leftover_gpu_processes_of_the_job_are_killed(nvml, child):
    nvml([shim.fake_gpu(0, processes=[{"pid": child.pid, "used_memory": GiB}])])
    slot = gpu.SlotGpus(GpuWatch(["GPU-fake-0000"]), gpu.Membership(None), {})
    killed = slot.kill_job_processes()
    assert [p.pid for p in killed] == [child.pid]
    assert child.wait(10) == -9


def test_framework_knobs_and_mps_limits(nvml, tmp_path):
    nvml([shim.fake_gpu(0)])
    pipe = tmp_path / "mps"
    pipe.mkdir()
    env = {gpu.SHARE_ENV: str(2 * GiB), "CUDA_MPS_PIPE_DIRECTORY": str(pipe), "PATH": str(tmp_path)}
    slot = gpu.SlotGpus(GpuWatch(["GPU-fake-0000"]), gpu.Membership(None), env, mode="mps")
    assert slot.env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.25", "TF_FORCE_GPU_ALLOW_GROWTH": "true",
                        "CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=2048M"}
    assert 'isolation.gpu_share = "mps"' in slot.blocked and "nvidia-cuda-mps-control" in slot.blocked
    tool = tmp_path / "nvidia-cuda-mps-control"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(stat.S_IRWXU)
    assert str(pipe) in gpu.mps_problem(env) and "-d" in gpu.mps_problem(env)
    os.mkfifo(pipe / "control")
    assert gpu.mps_problem(env) == ""


def test_gpu_share_config_key(tmp_path):
    from appliance.config import ConfigError, load_config
    cfg = tmp_path / "appliance.toml"
    cfg.write_text('[isolation]\ngpu_share = "mps"\n')
    assert load_config(cfg).isolation.gpu_share == "mps"
    cfg.write_text('[isolation]\ngpu_share = "mig"\n')
    with pytest.raises(ConfigError, match="gpu_share"):
        load_config(cfg)


def test_in_a_container_the_knobs_apply_but_not_the_process_checks(nvml):
    nvml([shim.fake_gpu(0, processes=[{"pid": 1, "used_memory": 6 * GiB}])])
    slot = gpu.SlotGpus(GpuWatch(["GPU-fake-0000"]), None, {gpu.SHARE_ENV: str(4 * GiB)})
    assert slot.foreign() == [] and slot.job_processes() == [] and "container" in slot.problem
    assert slot.env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.50"


def test_doctor_names_the_key_and_the_fix_when_mps_has_no_daemon(tmp_path, monkeypatch):
    from appliance.doctor import check
    from appliance.paths import Home
    home = Home.at(tmp_path / "home")
    home.ensure()
    home.config_file.write_text('[isolation]\ngpu_share = "mps"\n')
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control
    (finding,) = [f for f in check(home) if f.what == "gpu share"]
    assert not finding.ok
    assert 'isolation.gpu_share = "mps"' in finding.detail and "nvidia-cuda-mps-control -d" in finding.detail
    assert 'isolation.gpu_share = "none"' in finding.detail


def test_an_mps_server_on_the_gpu_is_not_foreign(nvml, tmp_path):
    import shutil
    server = tmp_path / "nvidia-cuda-mps-server"
    shutil.copy(shutil.which("sleep"), server)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    mps = subprocess.Popen([str(server), "60"], start_new_session=True)
    try:
        nvml([shim.fake_gpu(0, processes=[{"pid": mps.pid, "used_memory": GiB},
                                          {"pid": other.pid, "used_memory": GiB}])])
        members = gpu.Membership(None, runner_pid=-1)  # neither is a child of "the runner"
        slot = gpu.SlotGpus(GpuWatch(["GPU-fake-0000"]), members, {})
        assert [p.pid for p in slot.foreign()] == [other.pid]
    finally:
        for p in (other, mps):
            p.kill()
            p.wait()
