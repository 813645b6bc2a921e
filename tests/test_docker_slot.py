"""The docker backend against a real dockerd and a really built runner image (no mocks)."""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from appliance.image import build_image
from appliance.slot.cgroup import RUNNER_PIDS
from appliance.slot.docker_slot import (
    HOME_LABEL, SLOT_LABEL, container_name, docker_problems, list_slot_containers, remove_stale)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def slot_name() -> str:
    return f"slot-t{uuid.uuid4().hex[:6]}"


def slot_argv(image, home, slot, *command, cpus="0", memory=256 * MiB, shm=64 * MiB,
              extra=()):
    return [sys.executable, "-m", "appliance.slot.docker_slot", "--slot", slot,
            "--cpus", cpus, "--memory-bytes", str(memory), "--shm-bytes", str(shm),
            "--image", image, "--home", str(home), *extra, "--", *command]


def run_slot(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(slot_argv(*args, **kwargs), cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def python(code: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(code)]


def no_containers(client, home) -> bool:
    return list_slot_containers(home, client) == []


PROBE = """
    import json, os
    status = dict(l.split(":", 1) for l in open("/proc/self/status"))
    def read(path):
        return open(path).read().strip() if os.path.exists(path) else None
    shm = os.statvfs("/dev/shm")
    print(json.dumps({
        "cpus": status["Cpus_allowed_list"].strip(),
        "memory": read("/sys/fs/cgroup/memory/memory.limit_in_bytes") or read("/sys/fs/cgroup/memory.max"),
        "memsw": read("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"),
        "pids": read("/sys/fs/cgroup/pids/pids.max") or read("/sys/fs/cgroup/pids.max"),
        "shm": shm.f_blocks * shm.f_frsize,
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("CUDA_", "APPLIANCE_", "FOO"))},
    }))
"""


def test_slot_flags_are_the_limits_inside(docker_client, runner_image, tmp_path):
    slot = slot_name()
    cpus = "1" if os.cpu_count() > 1 else "0"
    done = run_slot(runner_image, tmp_path, slot, *python(PROBE), cpus=cpus,
                    memory=256 * MiB, shm=64 * MiB, extra=["--env", "FOO=bar=baz", "--pids-limit", "300"])
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["cpus"] == cpus
    assert int(seen["memory"]) == 256 * MiB
    assert seen["memsw"] in (None, str(256 * MiB))
    assert seen["shm"] == 64 * MiB
    assert seen["pids"] == str(300 + RUNNER_PIDS)  # a job's bound, and some for its runner
    account = pwd.getpwnam(f"appliance-{slot}")  # made on the host, handed in as numbers
    assert seen["env"] == {"FOO": "bar=baz", "CUDA_VISIBLE_DEVICES": "",
                           "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "APPLIANCE_GPU_MEMORY_BYTES": "0",
                           "APPLIANCE_SLOT": slot,
                           "APPLIANCE_WORKLOAD_USER": f"{account.pw_uid}:{account.pw_gid}",
                           "APPLIANCE_SLOT_MEMORY_BYTES": str(256 * MiB), "APPLIANCE_SLOT_SHM_BYTES": str(64 * MiB),
                           "APPLIANCE_ISOLATION": "docker"}
    assert no_containers(docker_client, tmp_path)


def test_output_streams_and_exit_code_pass_through(docker_client, runner_image, tmp_path):
    done = run_slot(runner_image, tmp_path, slot_name(), "sh", "-c",
                    "echo to-out; echo to-err >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, "to-out\n", "to-err\n")
    assert no_containers(docker_client, tmp_path)


def test_what_a_slot_needs_of_the_home_is_mounted_at_the_same_path_and_host_python_maps_to_image_python(
        docker_client, runner_image, tmp_path):
    # The renderer may write the host's interpreter path; inside, the image's python runs.
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "store.json").write_text("the admin key")
    (tmp_path / "appliance-id").write_text("the-lab-box-0123abcd\n")
    hello = tmp_path / "status" / "hello"
    # the job table and the ledger are the box's: what the runner writes there, the host sees
    shared = [tmp_path / "jobs" / "from-the-container", tmp_path / "ledger" / "from-the-container"]
    done = run_slot(runner_image, tmp_path, slot_name(), sys.executable, "-c",
                    f"import os, sys; open({str(hello)!r}, 'w').write(sys.executable + ' ' + "
                    f"str(os.path.exists({str(tmp_path / 'secrets')!r})) + ' ' + "
                    f"open({str(tmp_path / 'appliance-id')!r}).read())\n"
                    f"for p in {[str(p) for p in shared]!r}: open(p, 'w').write('written')")
    assert done.returncode == 0, done.stderr
    interpreter, secrets_seen, box_id = hello.read_text().split()
    assert box_id == "the-lab-box-0123abcd"  # the box's id, as every slot and the host see it
    assert interpreter.startswith("/opt/appliance/venv/bin/python")
    assert secrets_seen == "False"  # never the store's admin keys
    assert [p.read_text() for p in shared] == ["written", "written"]
    assert [oct(stat.S_IMODE(p.parent.stat().st_mode)) for p in shared] == ["0o700", "0o700"]


def start_slot(image, home, slot, code, extra=()):
    """Start docker_slot in the background; return it once the workload printed 'ready'."""
    proc = subprocess.Popen(slot_argv(image, home, slot, *python(code), extra=extra), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    return proc


def test_sigterm_drains_the_workload_and_removes_the_container(docker_client, runner_image,
                                                               tmp_path):
    slot = slot_name()
    proc = start_slot(runner_image, tmp_path, slot, """
        import signal, sys, time
        def drain(*_):
            print("draining", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, drain)
        print("ready", flush=True)
        time.sleep(600)
    """)
    assert [c["slot"] for c in list_slot_containers(tmp_path, docker_client)] == [slot]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, "draining\n"), err
    assert no_containers(docker_client, tmp_path)
    assert docker_client.containers.list(all=True, filters={"name": container_name(tmp_path, slot)}) == []


def test_a_workload_ignoring_sigterm_is_killed_after_the_stop_timeout(docker_client,
                                                                      runner_image, tmp_path):
    proc = start_slot(runner_image, tmp_path, slot_name(), """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """, extra=["--stop-timeout", "1"])
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 137
    assert no_containers(docker_client, tmp_path)


def test_a_memory_hog_is_oom_killed(docker_client, runner_image, tmp_path):
    done = run_slot(runner_image, tmp_path, slot_name(), *python("""
        hog = []
        while True:
            hog.append(bytearray(8 << 20))
    """), memory=64 * MiB)
    assert done.returncode == 137
    assert "OOM-killed" in done.stderr
    assert no_containers(docker_client, tmp_path)


def nvidia_runtime(client) -> bool:
    return "nvidia" in (client.info().get("Runtimes") or {})


def assert_one_clear_line(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    for word in words:
        assert word in stderr


def test_a_gpu_slot_without_the_nvidia_runtime_fails_clearly(docker_client, runner_image,
                                                             tmp_path):
    if nvidia_runtime(docker_client):
        pytest.skip("this dockerd has the NVIDIA runtime")
    done = run_slot(runner_image, tmp_path, slot_name(), "true",
                    extra=["--gpus", "GPU-00000000-1111-2222-3333-444444444444"])
    assert done.returncode == 2
    assert_one_clear_line(done.stderr, "NVIDIA Container Toolkit", "restart dockerd")
    assert no_containers(docker_client, tmp_path)  # nothing left in Created state


def test_a_missing_image_fails_clearly(docker_client, tmp_path):
    done = run_slot("appliance-runner:no-such-tag", tmp_path, slot_name(), "true")
    assert done.returncode == 2
    assert_one_clear_line(done.stderr, "does not exist", "python -m appliance.image")


def test_an_unreachable_daemon_fails_clearly(tmp_path):
    env = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    done = run_slot("any", tmp_path, slot_name(), "true", env=env)
    assert done.returncode == 2
    assert_one_clear_line(done.stderr, "cannot reach dockerd", "start dockerd")


def labelled_sleeper(client, image, home, slot):
    return client.containers.run(image, ["sleep", "600"], name=container_name(home, slot),
                                 labels={HOME_LABEL: str(home), SLOT_LABEL: slot},
                                 detach=True, init=True)


def test_a_stale_container_of_the_slot_is_replaced(docker_client, runner_image, tmp_path):
    slot = slot_name()
    stale = labelled_sleeper(docker_client, runner_image, tmp_path, slot)
    done = run_slot(runner_image, tmp_path, slot, "echo", "fresh")
    assert (done.returncode, done.stdout) == (0, "fresh\n"), done.stderr
    assert docker_client.containers.list(all=True, filters={"id": stale.id}) == []


def test_a_slot_of_another_home_keeps_its_container(docker_client, runner_image, tmp_path):
    slot = slot_name()
    theirs = labelled_sleeper(docker_client, runner_image, tmp_path / "theirs", slot)
    try:
        done = run_slot(runner_image, tmp_path / "mine", slot, "echo", "mine")
        assert (done.returncode, done.stdout) == (0, "mine\n"), done.stderr
        theirs.reload()
        assert theirs.status == "running", "an up of one home replaced another home's container"
    finally:
        remove_stale(tmp_path / "theirs", docker_client)


def test_list_and_remove_stale_see_only_their_home(docker_client, runner_image, tmp_path):
    home, other = tmp_path / "home", tmp_path / "other"
    slots = [slot_name(), slot_name()]
    for slot in slots:
        labelled_sleeper(docker_client, runner_image, home, slot)
    kept = labelled_sleeper(docker_client, runner_image, other, slot_name())
    try:
        listed = list_slot_containers(home, docker_client)
        assert sorted(c["slot"] for c in listed) == sorted(slots)
        assert {c["status"] for c in listed} == {"running"}
        assert sorted(remove_stale(home, docker_client)) == sorted(container_name(home, s) for s in slots)
        assert list_slot_containers(home, docker_client) == []
        assert [c["id"] for c in list_slot_containers(other, docker_client)] == [kept.id]
    finally:
        remove_stale(other, docker_client)
        remove_stale(home, docker_client)


def test_docker_problems_name_the_fix(docker_client, monkeypatch, tmp_path):
    assert docker_problems() == []
    if not nvidia_runtime(docker_client):
        [gpu] = docker_problems(gpus_needed=True)
        assert "NVIDIA Container Toolkit" in gpu
    [image] = docker_problems(image="appliance-runner:no-such-tag")
    assert "python -m appliance.image" in image
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    [daemon] = docker_problems()
    assert "cannot reach dockerd" in daemon and "start dockerd" in daemon


def test_the_image_has_a_shell_tools_and_packages_for_any_user(docker_client, runner_image):
    script = ("echo hi | cat && ls / >/dev/null && env | grep -q PATH && "
              "python -c 'import appliance.runner, boto3, docker, pika, ssl, sqlite3; "
              "print(\"ok\")'")
    for user in ("root", "65534"):
        out = docker_client.containers.run(runner_image, ["sh", "-c", script], user=user,
                                           remove=True, network_mode="none")
        assert out.decode() == "hi\nok\n"


def test_the_image_can_be_rebuilt_under_the_same_tag(docker_client):
    tag = f"appliance-runner:test-{uuid.uuid4().hex[:6]}"
    lines = []
    try:
        first = build_image(tag, progress=lines.append, client=docker_client)
        second = build_image(tag, progress=lines.append, client=docker_client)
        assert docker_client.images.get(tag).id == second
        if first != second:  # the previous build, untagged and unused, is gone
            import docker
            with pytest.raises(docker.errors.ImageNotFound):
                docker_client.images.get(first)
        assert any("MB" in line for line in lines)
    finally:
        docker_client.images.remove(tag, force=True)


def test_experiment_virtualenvs_can_be_built_inside_the_image(docker_client, runner_image):
    # the runner builds each experiment's environment with `python -m venv` (pip via ensurepip)
    script = "python -m venv /tmp/v && /tmp/v/bin/python -m pip --version"
    out = docker_client.containers.run(runner_image, ["sh", "-c", script], remove=True, network_mode="none")
    assert out.decode().startswith("pip ")
