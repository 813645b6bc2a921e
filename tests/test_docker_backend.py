"""isolation.backend = "docker" end to end with the real CLI, dockerd and store:
`config set isolation.backend docker`, `image build`, `up` -> every slot RUNNING as a container
with the plan's cpuset, memory limit and /dev/shm; an experiment runs in one and its output
reaches the store; a memory hog fails its job as out of memory and the slot keeps running;
`down` leaves no container. Plus: stale containers are removed at `up`, and an unreachable
daemon makes `doctor` and `up` say how to fix it (and `up` start nothing)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from appliance.inventory import format_cpu_list
from appliance.jobs.table import CANCELLED, DONE, RUNNING
from appliance.plan import Plan
from appliance.slot.docker_slot import HOME_LABEL, SLOT_LABEL, container_name
from tests.appliance_fixtures import (artifact_text, finished_row, job_row, last_result, make_home, stop_home,
                                      submit)
from tests.realparts import wait_for

pytestmark = pytest.mark.integration

DEAD_DOCKER = "unix:///nonexistent/appliance-test-docker.sock"

# What the slot's container sees, printed as JSON (cgroup v1 and v2 paths).
PROBE = """
import json, os
def read(*paths):
    for p in paths:
        if os.path.exists(p):
            return open(p).read().strip()
st = os.statvfs("/dev/shm")
print(json.dumps({
    "cpus": read("/sys/fs/cgroup/cpuset/cpuset.cpus", "/sys/fs/cgroup/cpuset.cpus.effective"),
    "memory": read("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"),
    "shm": st.f_blocks * st.f_frsize,
}))
"""

WORKLOAD = (
    "import os, sys\n"
    "print('in a container:', os.path.exists('/.dockerenv'), flush=True)\n"
    "print('slot', os.environ.get('APPLIANCE_SLOT'), 'args', sys.argv[1:], flush=True)\n"
    "print('done', flush=True)\n")

# Allocates (and touches) past any slot's memory; the kernel must take it, not the runner.
HOG = (
    "chunks = []\n"
    "print('allocating', flush=True)\n"
    "while True:\n"
    "    chunks.append(b'\\x01' * (16 << 20))\n")


def home_containers(client, home) -> list:
    label = f"{HOME_LABEL}={home.root.resolve()}"
    return client.containers.list(all=True, filters={"label": label})


@pytest.fixture(scope="module")
def image_tag(docker_client):
    """A runner image built once for this module with the real CLI; removed at the end."""
    tag = f"appliance-runner:backend-test-{uuid.uuid4().hex[:6]}"
    yield tag
    try:
        docker_client.images.remove(tag, force=True)
    except Exception:  # noqa: BLE001  (never built: the build test failed)
        pass


@pytest.fixture(scope="module")
def docker_appliance(tmp_path_factory, docker_client, image_tag):
    """An appliance with the docker backend, switched and built the way a user would; a stale
    labelled container from a "crash" waits for `up` to remove it."""
    home = make_home(tmp_path_factory.mktemp("docker-appliance"))
    home.cli("config", "set", "isolation.backend", "docker")
    built = home.cli("image", "build", "--tag", image_tag, timeout=600)
    assert image_tag in built.stdout
    home.cli("config", "set", "isolation.docker_image", image_tag)
    stale = docker_client.containers.create(
        image_tag, ["sleep", "600"], name=f"appliance-stale-{uuid.uuid4().hex[:6]}",
        labels={HOME_LABEL: str(home.root.resolve()), SLOT_LABEL: "slot-99"})
    home.stale_id = stale.id
    try:
        home.cli("up", "--timeout", "120")
        yield home
    finally:
        stop_home(home)
        for c in home_containers(docker_client, home):  # never leave any behind
            c.remove(force=True)


def plan_of(home) -> Plan:
    return Plan.from_json(home.home.plan_file.read_text())


def test_every_slot_runs_as_a_container_with_the_plan_limits_inside(docker_appliance, docker_client):
    plan = plan_of(docker_appliance)
    assert plan.slots
    slots = {s["name"]: s for s in docker_appliance.status()["slots"]}
    for slot in plan.slots:
        facts = slots[slot.name]
        assert facts["state"] == "RUNNING", facts
        assert facts["container_id"], facts  # status shows the container
        container = docker_client.containers.get(facts["container_id"])
        assert container.status == "running"
        assert container.name == container_name(docker_appliance.root, slot.name)
        assert container.labels[SLOT_LABEL] == slot.name
        code, out = container.exec_run(["python", "-c", PROBE])
        assert code == 0, out
        seen = json.loads(out)
        assert seen["cpus"] == format_cpu_list(slot.cpus)
        assert int(seen["memory"]) == slot.memory_bytes
        assert seen["shm"] == slot.shm_bytes
        # the memory in use comes from the container's cgroup
        assert facts["memory_used_bytes"] and 0 < facts["memory_used_bytes"] <= slot.memory_bytes
    text = docker_appliance.cli("status").stdout
    assert "container " in text


def test_a_stale_container_from_a_crash_is_removed_at_up(docker_appliance, docker_client):
    ids = {c.id for c in home_containers(docker_client, docker_appliance)}
    assert docker_appliance.stale_id not in ids
    assert len(ids) == len(plan_of(docker_appliance).slots)


def test_an_experiment_runs_in_a_container_and_its_output_reaches_the_store(docker_appliance, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "train.py").write_text(WORKLOAD)
    key = submit(docker_appliance, ws, "train.py", "--lr", "0.1")
    result = wait_for("the experiment to finish", lambda: last_result(docker_appliance, key), timeout=240)
    assert result["outcome"] == "success", result
    output = wait_for("the output artifact", lambda: artifact_text(docker_appliance, key))
    assert "in a container: True" in output
    assert "args ['--lr', '0.1']" in output and "done" in output


def test_a_memory_hog_fails_as_out_of_memory_and_the_slot_keeps_running(docker_appliance, tmp_path):
    before = {s["name"]: s["container_id"] for s in docker_appliance.status()["slots"]}
    ws = tmp_path / "hog"
    ws.mkdir()
    (ws / "hog.py").write_text(HOG)
    key = submit(docker_appliance, ws, "hog.py")
    result = wait_for("the hog to be stopped", lambda: last_result(docker_appliance, key), timeout=240)
    assert result["outcome"] == "out of memory", result
    # counted, not guessed: over the slot's limit, or over its ram (256mb) at the runner's look
    assert "memory limit" in result["reason"], result
    after = docker_appliance.status()["slots"]
    # the runner survived: same containers, all still running
    assert {s["name"]: s["container_id"] for s in after} == before
    assert all(s["state"] == "RUNNING" for s in after), after


# Looks at /dev/shm first (it must be empty and whole), then leaves a secret and 32 MiB in it
# for whichever job runs on this slot next.
SHM_LOOK_THEN_WRITE = (
    "import os\n"
    "st = os.statvfs('/dev/shm')\n"
    "print('seen', sorted(os.listdir('/dev/shm')), 'free', st.f_bavail * st.f_frsize, flush=True)\n"
    "open('/dev/shm/secret', 'w').write('SECRET-IN-MY-PRIVATE-SHM')\n"
    "os.chmod('/dev/shm/secret', 0o644)\n"
    "open('/dev/shm/fill', 'wb').write(b'x' * (32 << 20))\n"
    "print('wrote', flush=True)\n")


def test_the_next_job_in_a_container_finds_dev_shm_empty(docker_appliance, tmp_path):
    """One job more than there are slots, one after another: at least two share a slot
    (whichever the scheduler picks), and every one finds /dev/shm empty and whole although
    each job before it left a file and 32 MiB there."""
    ws = tmp_path / "shm"
    ws.mkdir()
    (ws / "look.py").write_text(SHM_LOOK_THEN_WRITE)
    shm_of = {s.name: s.shm_bytes for s in plan_of(docker_appliance).slots}
    slots_used = []
    for _ in range(len(shm_of) + 1):
        key = submit(docker_appliance, ws, "look.py")
        row = wait_for("the job", lambda key=key: finished_row(docker_appliance, key), timeout=240)
        assert row.state == DONE, row
        text = wait_for("its output", lambda key=key: artifact_text(docker_appliance, key))
        assert "seen [] free" in text and "wrote" in text, text
        assert int(text.split(" free ")[1].split()[0]) == shm_of[row.slot], text
        slots_used.append(row.slot)
    assert len(set(slots_used)) < len(slots_used), slots_used  # a slot ran a job after a writer


LONG = "import time\nprint('started, working', flush=True)\ntime.sleep(600)\n"


def test_a_job_in_a_container_shows_running_and_its_owner_cancels_it(docker_appliance, tmp_path):
    """The job table and the ledger are mounted in each slot's container: the job shows as
    running, `cancel` stops it, and `wait` says it was cancelled (before, the row stayed
    queued, `wait` never returned and a cancel never reached the runner)."""
    ws = tmp_path / "long"
    ws.mkdir()
    (ws / "long.py").write_text(LONG)
    key = submit(docker_appliance, ws, "long.py")
    row = wait_for("it to run", lambda: (r := job_row(docker_appliance, key)) and r.state == RUNNING and r, timeout=240)
    assert row.slot in {s.name for s in plan_of(docker_appliance).slots}
    wait_for("its first line", lambda: "started, working" in docker_appliance.cli("logs", key, check=False).stdout)
    assert "cancelling" in docker_appliance.cli("cancel", key).stdout
    assert docker_appliance.cli("wait", key, check=False, timeout=120).returncode == 143
    row = job_row(docker_appliance, key)
    assert (row.state, row.class_) == (CANCELLED, "cancelled"), row


# under the slot's 512MiB, over its ram
TOUCH_300 = (
    "import time\n"
    "b = bytearray(300 << 20)\n"
    "for i in range(0, len(b), 4096):\n"
    "    b[i] = 1\n"
    "time.sleep(5)\n"
    "print('survived', flush=True)\n")


def test_a_requests_ram_is_its_limit_in_a_container_too(docker_appliance, tmp_path):
    ws = tmp_path / "ram"
    ws.mkdir()
    (ws / "touch.py").write_text(TOUCH_300)
    key = submit(docker_appliance, ws, "touch.py", ram="128mb")
    result = wait_for("the job to be stopped", lambda: last_result(docker_appliance, key), timeout=240)
    assert result["outcome"] == "out of memory", result
    assert "the request's ram, 128 MiB" in result["reason"], result


def test_down_leaves_no_container(docker_appliance, docker_client):
    assert home_containers(docker_client, docker_appliance)
    docker_appliance.cli("down", "--timeout", "120")
    assert home_containers(docker_client, docker_appliance) == []
    assert not docker_appliance.status()["running"]


@pytest.fixture
def dead_daemon_home(tmp_path, docker_client):
    home = make_home(tmp_path)
    home.cli("config", "set", "isolation.backend", "docker")
    home.env["DOCKER_HOST"] = DEAD_DOCKER
    yield home
    stop_home(home)


def test_doctor_names_the_fix_for_an_unreachable_daemon(dead_daemon_home):
    done = dead_daemon_home.cli("doctor", check=False)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    assert "cannot reach dockerd" in text and DEAD_DOCKER in text, text
    assert "start dockerd" in text, text
    assert "Traceback" not in text


def test_up_with_an_unreachable_daemon_fails_clearly_and_starts_nothing(dead_daemon_home, docker_client):
    done = dead_daemon_home.cli("up", "--timeout", "60", check=False)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    assert "cannot reach dockerd" in text and "start dockerd" in text, text
    assert "Traceback" not in text
    assert not dead_daemon_home.status()["running"]
    assert home_containers(docker_client, dead_daemon_home) == []


def test_up_without_the_runner_image_says_how_to_build_it_and_starts_nothing(tmp_path, docker_client):
    home = make_home(tmp_path)
    try:
        home.cli("config", "set", "isolation.backend", "docker")
        home.cli("config", "set", "isolation.docker_image", "appliance-runner:no-such-tag")
        done = home.cli("up", "--timeout", "60", check=False)
        text = done.stdout + done.stderr
        assert done.returncode != 0, text
        assert "does not exist" in text and "appliance image build" in text, text
        assert not home.status()["running"]
        assert home_containers(docker_client, home) == []
    finally:
        stop_home(home)


def nvidia_runtime(client) -> bool:
    import shutil
    return "nvidia" in (client.info().get("Runtimes") or {}) or bool(
        shutil.which("nvidia-container-runtime-hook"))


def test_a_gpu_slot_without_the_nvidia_runtime_is_refused_by_doctor_and_up(tmp_path, docker_client):
    if nvidia_runtime(docker_client):
        pytest.skip("this dockerd has the NVIDIA runtime")
    from tests.fake_nvml.shim import fake_gpu, write_gpus

    repo = Path(__file__).resolve().parent.parent
    gpus_json = tmp_path / "gpus.json"
    write_gpus(gpus_json, [fake_gpu(1)])
    home = make_home(tmp_path, '[slots.gpu]\ncpus = 1\nmemory = "512MiB"\nshm = "64MiB"\n')
    home.env["PYTHONPATH"] = f"{repo / 'tests' / 'fake_nvml'}:{repo}"
    home.env["APPLIANCE_FAKE_NVML"] = str(gpus_json)
    try:
        home.cli("config", "set", "isolation.backend", "docker")
        doctor = home.cli("doctor", check=False)
        assert doctor.returncode != 0 and "NVIDIA Container Toolkit" in doctor.stdout + doctor.stderr
        done = home.cli("up", "--timeout", "60", check=False)
        text = done.stdout + done.stderr
        assert done.returncode != 0, text
        assert "no NVIDIA runtime" in text and "NVIDIA Container Toolkit" in text, text
        assert "Traceback" not in text
        assert not home.status()["running"]
        assert home_containers(docker_client, home) == []
    finally:
        stop_home(home)

