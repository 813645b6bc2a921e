"""The controller: GPU changes re-plan and apply only the difference; credentials entries are
checked and shown; bad input (NVML raising, bursts, a deleted directory) is survived.

Unit tests drive `Controller` with a fake scan and no supervisord. Integration tests run the
real CLI, real supervisord and a real RabbitMQ, with NVML faked at the pynvml boundary
(tests/fake_nvml) in every process the appliance starts.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from appliance.controller import Controller
from appliance.gpus import Gpu, GpuScan, MigDevice
from appliance.paths import Home
from appliance.queues.sources import sources_file
from tests.realparts import wait_for

REPO = Path(__file__).resolve().parent.parent
FAKE_NVML = REPO / "tests" / "fake_nvml"


def gpu(n: int, healthy=True, problem="") -> Gpu:
    return Gpu(n, f"GPU-{n}", "Fake", 8 << 30, None, healthy, problem)


class FakeScan:
    def __init__(self, *gpus):
        self.result = GpuScan(tuple(gpus))
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.fixture
def home(tmp_path) -> Home:
    h = Home.at(tmp_path / "home")
    h.ensure()
    h.config_file.write_text('[host]\nreserved_cpus = 0\nreserved_memory = "1GiB"\n'
                             '[slots.cpu]\nmemory = "256MiB"\n[slots.gpu]\ncpus = 1\nmemory = "256MiB"\n'
                             '[gpus]\npoll_interval = "0.05s"\n[controller]\ndebounce = "0.2s"\n')
    return h


def events(home: Home) -> list[dict]:
    try:
        return [json.loads(line) for line in home.events_file.read_text().splitlines()]
    except FileNotFoundError:
        return []


def test_gpu_lost_and_back_replans_with_cause_and_diff(home):
    scan = FakeScan(gpu(0))
    c = Controller(home, scan=scan, apply=False)
    c.poll_gpus()
    first = json.loads(home.plan_file.read_text())
    gpu_slot = next(s for s in first["slots"] if s["kind"] == "gpu")
    cpu_slots = {s["name"] for s in first["slots"] if s["kind"] == "cpu"}

    scan.result = GpuScan(())
    c.poll_gpus()
    ev = events(home)[-1]
    assert ev["cause"] == "GPU 0 (GPU-0) lost"
    assert ev["removed"] == [gpu_slot["name"]] and ev["changed"] == []
    assert set(ev["added"]).isdisjoint(cpu_slots)  # CPU slots untouched
    assert "time_text" in ev and ev["time"] > 0

    scan.result = GpuScan((gpu(0),))
    c.poll_gpus()
    ev = events(home)[-1]
    assert ev["cause"] == "GPU 0 (GPU-0) appeared" and len(ev["added"]) == 1

    scan.result = GpuScan((gpu(0, healthy=False, problem="2 uncorrected ECC errors"),))
    c.poll_gpus()
    ev = events(home)[-1]
    assert "unhealthy: 2 uncorrected ECC errors" in ev["cause"] and len(ev["removed"]) == 1
    assert any("ECC" in n for n in ev["notes"])


def test_nvml_failing_mid_poll_keeps_the_gpus_until_the_grace_ends(home):
    scan = FakeScan(gpu(0))
    c = Controller(home, scan=scan, apply=False)
    c.nvml_grace_s = 0.3
    c.poll_gpus()
    n = len(events(home))
    scan.result = RuntimeError("driver hiccup")
    for _ in range(5):
        c.poll_gpus()  # raises inside the scan: no crash, no re-plan yet
    assert len(events(home)) == n
    scan.result = GpuScan((gpu(0),))
    c.poll_gpus()
    assert len(events(home)) == n and c.nvml_failures == 0
    scan.result = GpuScan((), "NVML failed while listing GPUs: Unknown Error")
    for _ in range(4):
        c.poll_gpus()
    time.sleep(0.35)
    c.poll_gpus()
    ev = events(home)[-1]
    assert "lost" in ev["cause"] and ev["removed"]


def test_a_disabled_gpu_in_the_config_is_fenced(home):
    from appliance.config import set_value

    scan = FakeScan(gpu(0), gpu(1))
    c = Controller(home, scan=scan, apply=False)
    c.poll_gpus()
    c.watch.start()
    try:
        set_value(home.config_file, "gpus.disabled", "GPU-1")
        wait_for("the config change to be re-planned",
                 lambda: (c.step(), events(home)[-1]["cause"].startswith("config"))[1], timeout=10)
        plan = json.loads(home.plan_file.read_text())
        assert [s["gpus"] for s in plan["slots"] if s["kind"] == "gpu"] == [["GPU-0"]]
    finally:
        c.watch.stop()


def mig_gpu(n: int, *devices: str) -> Gpu:
    return Gpu(n, f"GPU-{n}", "Fake", 80 << 30, None, mig_enabled=True,
               mig_devices=tuple(MigDevice(u, 10 << 30, i) for i, u in enumerate(devices)))


def test_a_mig_layout_change_replans_only_the_mig_devices_that_changed(home):
    scan = FakeScan(mig_gpu(0, "MIG-a", "MIG-b"))  # this box may have only 2 CPUs
    c = Controller(home, scan=scan, apply=False)
    c.poll_gpus()
    first = {tuple(s["gpus"]): s["name"] for s in json.loads(home.plan_file.read_text())["slots"]}
    assert ("MIG-a",) in first and ("MIG-b",) in first
    n = len(events(home))
    c.poll_gpus()
    assert len(events(home)) == n  # same layout: nothing

    scan.result = GpuScan((mig_gpu(0, "MIG-a", "MIG-c"),))
    c.poll_gpus()
    ev = events(home)[-1]
    assert ev["cause"] == "GPU 0 (GPU-0) MIG devices changed: +MIG-c -MIG-b"
    assert ev["removed"] == [first[("MIG-b",)]] and ev["changed"] == []
    after = {tuple(s["gpus"]): s["name"] for s in json.loads(home.plan_file.read_text())["slots"]}
    assert after[("MIG-a",)] == first[("MIG-a",)]
    assert after[("MIG-c",)] in ev["added"]

    scan.result = GpuScan((gpu(0),))  # MIG off
    c.poll_gpus()
    assert "GPU 0 (GPU-0) MIG mode off" in events(home)[-1]["cause"]


def test_a_burst_of_credential_writes_is_checked_once(home, monkeypatch):
    c = Controller(home, scan=FakeScan(), apply=False)
    calls = []
    real = c.check_credentials
    monkeypatch.setattr(c, "check_credentials", lambda cause: calls.append(cause) or real(cause))
    c.watch.start()
    try:
        c.step()
        calls.clear()
        for i in range(50):
            (home.credentials_dir / f"q{i}.toml").write_text(f'url = "amqp://u:p@127.0.0.1:1/%2f"  # {i}\n')
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            c.step()
            time.sleep(0.05)
        assert calls == ["credentials changed"]
        rows = json.loads(sources_file(home).read_text())["sources"]
        assert len(rows) == 51 and rows[0]["name"] == "local"
        assert all(r["state"] == "broken" and "cannot connect" in r["reason"] for r in rows[1:])
        # the directory deleted: one more check, only the local queue left, no crash
        for p in home.credentials_dir.iterdir():
            p.unlink()
        home.credentials_dir.rmdir()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            c.step()
            time.sleep(0.05)
        assert [r["name"] for r in json.loads(sources_file(home).read_text())["sources"]] == ["local"]
        assert "queue sources changed" in events(home)[-1]["cause"]
        # ...and made again with an entry: it is found (the watch is set up again)
        home.credentials_dir.mkdir()
        (home.credentials_dir / "again.toml").write_text("url = \"amqp://u:p@127.0.0.1:1/%2f\"\n")
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and len(json.loads(sources_file(home).read_text())["sources"]) < 2:
            c.step()
            time.sleep(0.05)
        assert [r["name"] for r in json.loads(sources_file(home).read_text())["sources"]] == ["local", "rabbitmq:again"]
    finally:
        c.watch.stop()


def test_the_controller_wakes_for_its_config_and_credentials_not_for_other_files_of_the_home(home):
    """Runners write the job table and their records in HOME many times per job: none of it may
    wake the controller (it did, ~2 ms of CPU per job); appliance.toml, written in place or
    replaced by an editor's rename, and the credentials directory do."""
    import select

    from appliance.controller_watch import Watch

    watch = Watch(home, home.credentials_dir)
    watch.start()
    woken = lambda: bool(select.select([watch.inotify.fd], [], [], 0.2)[0])  # noqa: E731
    try:
        written = [home.jobs_dir / "jobs.db", home.jobs_dir / "jobs.db-wal", home.ledger_dir / "entry.json",
                   home.root / "events.jsonl"]
        for path in written:
            path.write_text("x")  # made once, then written again
        woken() and watch.take(0)
        written[0].write_text("y")
        with open(written[1], "a") as f:
            f.write("z")
        os.replace(written[0], written[2])
        os.utime(written[3])
        assert not woken()
        home.config_file.write_text(home.config_file.read_text() + "\n")  # in place
        assert woken() and watch.take(0) == (False, True)
        tmp = home.root / ".appliance.toml.tmp"
        tmp.write_text(home.config_file.read_text())
        os.replace(tmp, home.config_file)  # an editor's save
        assert woken() and watch.take(0) == (False, True)
        with open(home.config_file, "a") as f:  # the new file is watched too
            f.write("\n")
        assert woken() and watch.take(0) == (False, True)
        (home.credentials_dir / "lab.toml").write_text("url = 'amqp://x'\n")
        assert woken() and watch.take(0) == (True, False)
    finally:
        watch.stop()


# ---------------------------------------------------------------- real supervisord

def fake_env(appliance, gpus_json: Path) -> None:
    appliance.env["PYTHONPATH"] = f"{FAKE_NVML}:{REPO}"
    appliance.env["APPLIANCE_FAKE_NVML"] = str(gpus_json)


def appliance_with_one_fake_gpu(tmp_path):
    """A test appliance (not started) whose NVML lists one fake GPU, from the returned JSON file."""
    from tests.appliance_fixtures import make_home
    from tests.fake_nvml.shim import fake_gpu, write_gpus

    gpus_json = tmp_path / "gpus.json"
    write_gpus(gpus_json, [fake_gpu(1)])
    appliance = make_home(tmp_path, '[gpus]\npoll_interval = "0.3s"\n[slots.gpu]\ncpus = 1\n'
                                    'memory = "512MiB"\nshm = "64MiB"\n')
    fake_env(appliance, gpus_json)
    return appliance, gpus_json


def slot_pids(appliance) -> dict:
    return {s["name"]: s["pid"] for s in appliance.status()["slots"]}


def test_gpu_loss_drains_its_slot_and_return_brings_it_back_under_supervisord(tmp_path):
    from tests.appliance_fixtures import stop_home
    from tests.fake_nvml.shim import fake_gpu, write_gpus

    appliance, gpus_json = appliance_with_one_fake_gpu(tmp_path)
    try:
        appliance.cli("up", "--timeout", "90")
        facts = appliance.status()
        gpu_slot = next(s for s in facts["slots"] if s["kind"] == "gpu")
        cpu_slot = next(s for s in facts["slots"] if s["kind"] == "cpu")
        wait_for("the controller to run",
                 lambda: "controller for" in (appliance.home.logs_dir / "controller.log").read_text())

        write_gpus(gpus_json, [])  # the GPU falls off the bus
        wait_for("the GPU slot to drain",
                 lambda: gpu_slot["name"] not in slot_pids(appliance) and
                 all(s["state"] == "RUNNING" for s in appliance.status()["slots"]))
        facts = appliance.status()
        assert slot_pids(appliance)[cpu_slot["name"]] == cpu_slot["pid"]  # untouched
        last = facts["last_rebalance"]
        assert "lost" in last["cause"] and last["removed"] == [gpu_slot["name"]]
        parent = appliance.env["APPLIANCE_CGROUP_PARENT"]
        wait_for("the drained slot's cgroup to go", lambda: not any(
            (Path("/sys/fs/cgroup") / c / parent / gpu_slot["name"]).exists() for c in ("cpuset", "memory")))
        assert (Path("/sys/fs/cgroup/memory") / parent / cpu_slot["name"]).is_dir()

        write_gpus(gpus_json, [fake_gpu(1)])  # and comes back
        wait_for("a GPU slot again", lambda: any(
            s["kind"] == "gpu" and s["state"] == "RUNNING" for s in appliance.status()["slots"]))
        assert slot_pids(appliance)[cpu_slot["name"]] == cpu_slot["pid"]
        assert "appeared" in appliance.status()["last_rebalance"]["cause"]
        out = appliance.cli("status").stdout
        assert "last rebalance:" in out and "appeared" in out

        # NVML raising for a moment: nothing drains
        before = slot_pids(appliance)
        write_gpus(gpus_json, [fake_gpu(1)], fail="flaky")
        time.sleep(1.5)
        write_gpus(gpus_json, [fake_gpu(1)])
        time.sleep(1.0)
        assert slot_pids(appliance) == before
        assert "keeping the last GPU list" in (appliance.home.logs_dir / "controller.log").read_text()
    finally:
        stop_home(appliance)


def runner_environment(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_a_mig_layout_change_replans_live_and_slots_see_their_mig_device(tmp_path):
    from tests.appliance_fixtures import make_home, stop_home
    from tests.fake_nvml.shim import fake_gpu, write_gpus

    def mig(*devices):
        return [fake_gpu(0, memory=80 << 30, mig={"enabled": True, "devices": [
            {"index": i, "uuid": u, "memory": m << 30} for i, (u, m) in devices]})]

    gpus_json = tmp_path / "gpus.json"
    write_gpus(gpus_json, mig((0, ("MIG-aaaa", 10)), (1, ("MIG-bbbb", 20))))
    appliance = make_home(tmp_path, '[gpus]\npoll_interval = "0.3s"\n[slots.gpu]\ncpus = 1\n'
                                    'memory = "512MiB"\nshm = "64MiB"\n')
    fake_env(appliance, gpus_json)
    try:
        appliance.cli("up", "--timeout", "90")
        wait_for("the MIG slots to run", lambda: sorted(
            s["gpus"][0] for s in appliance.status()["slots"] if s["gpus"] and s["state"] == "RUNNING")
            == ["MIG-aaaa", "MIG-bbbb"])
        slots = {s["gpus"][0]: s for s in appliance.status()["slots"] if s["gpus"]}
        env = runner_environment(slots["MIG-aaaa"]["pid"])
        assert env["CUDA_VISIBLE_DEVICES"] == "MIG-aaaa"
        assert env["APPLIANCE_GPU_MEMORY_BYTES"] == str(10 << 30)
        assert slots["MIG-bbbb"]["gpu_memory_bytes"] == 20 << 30 and slots["MIG-bbbb"]["mig"]
        assert "MIG-bbbb 20GiB" in appliance.cli("gpu", "list").stdout

        # the 20 GiB instance is destroyed and a 15 GiB one made: only its slot changes
        write_gpus(gpus_json, mig((0, ("MIG-aaaa", 10)), (2, ("MIG-cccc", 15))))
        wait_for("the new MIG device's slot to run", lambda: sorted(
            s["gpus"][0] for s in appliance.status()["slots"] if s["gpus"] and s["state"] == "RUNNING")
            == ["MIG-aaaa", "MIG-cccc"], timeout=60)
        now = {s["gpus"][0]: s for s in appliance.status()["slots"] if s["gpus"]}
        assert now["MIG-aaaa"]["pid"] == slots["MIG-aaaa"]["pid"]  # untouched
        env = runner_environment(now["MIG-cccc"]["pid"])
        assert (env["CUDA_VISIBLE_DEVICES"], env["APPLIANCE_GPU_MEMORY_BYTES"]) == ("MIG-cccc", str(15 << 30))
        last = appliance.status()["last_rebalance"]
        assert "MIG devices changed: +MIG-cccc -MIG-bbbb" in last["cause"]
        assert last["removed"] == [slots["MIG-bbbb"]["name"]]
        assert "MIG 1/" not in appliance.cli("status").stdout and "0 MIG 15GiB" in appliance.cli("status").stdout
    finally:
        stop_home(appliance)


def test_gpu_disable_and_enable_by_hand(tmp_path):
    from tests.appliance_fixtures import stop_home

    appliance, _ = appliance_with_one_fake_gpu(tmp_path)
    try:
        appliance.cli("up", "--timeout", "90")
        out = appliance.cli("gpu", "disable", "GPU-fake-0001").stdout
        assert "disabled" in out
        assert "GPU-fake-0001" in appliance.home.config_file.read_text()
        wait_for("the GPU slot to go", lambda: all(s["kind"] == "cpu" and s["state"] == "RUNNING"
                                                  for s in appliance.status()["slots"]))
        appliance.cli("gpu", "enable", "0")
        wait_for("the GPU slot to come back", lambda: any(
            s["kind"] == "gpu" and s["state"] == "RUNNING" for s in appliance.status()["slots"]))
        bad = appliance.cli("gpu", "disable", "7", check=False)
        assert bad.returncode == 2 and "no GPU 7" in bad.stderr
    finally:
        stop_home(appliance)


def test_a_rabbitmq_credential_is_served_live_without_restarting_busy_slots(rabbit, store, tmp_path):
    """A job runs on one slot; a RabbitMQ entry is written: a message on its rmq_ queue runs on
    the other slot, nothing restarts, the running job finishes once. A broken entry next to it
    shows in `appliance status` with its reason and changes nothing."""
    from appliance.queues.local import enqueue
    from appliance.queues.rabbitmq import publish
    from tests.appliance_fixtures import make_home, stop_home
    from tests.rabbitmq_fixtures import marker_lines, marker_request, upload_marker_workspace

    marker = tmp_path / "marker.log"
    ws_key = upload_marker_workspace(store, tmp_path)
    appliance = make_home(tmp_path, f'python = "{sys.executable}"\n')
    try:
        appliance.cli("up", "--timeout", "90")
        before = slot_pids(appliance)
        busy_key, body = marker_request(store, ws_key, marker, seconds=6)
        enqueue(appliance.home.queue_root, "local_busy", body)
        wait_for("the local job to start", lambda: any(k == busy_key for _, k, _ in marker_lines(marker)))

        creds = appliance.home.credentials_dir
        (creds / "broken.toml").write_text(rabbit.credential(password="wrong"))
        tmp = creds / ".main.toml.tmp"
        tmp.write_text(rabbit.credential())
        os.replace(tmp, creds / "main.toml")  # an editor's atomic save
        queue = f"rmq_live_{uuid.uuid4().hex[:6]}"
        key, body = marker_request(store, ws_key, marker, seconds=0.1)
        publish(rabbit.url, queue, body)
        wait_for("the rmq job to finish", lambda: ("done", key) in {(w, k) for w, k, _ in marker_lines(marker)},
                 timeout=60)
        wait_for("the busy job to finish", lambda: ("done", busy_key) in {(w, k) for w, k, _ in marker_lines(marker)},
                 timeout=60)
        assert [w for w, k, _ in marker_lines(marker) if k == busy_key] == ["start", "done"]  # never restarted
        assert slot_pids(appliance) == before

        # the busy slot's runner takes the entry up once its job is settled, a moment after the
        # workload's own "done": wait for every slot to say so rather than read it at once
        facts = wait_for("the controller to check both entries and every slot to serve main", lambda: (
            lambda f: f if len(f["sources"]["sources"]) == 3
            and all("rabbitmq:main" in (s["serves"] or {}) for s in f["slots"]) else None)(appliance.status()),
            timeout=30)
        rows = {r["name"]: r for r in facts["sources"]["sources"]}
        assert rows["rabbitmq:main"]["state"] == "ok" and queue in rows["rabbitmq:main"]["queues"]
        assert rows["rabbitmq:broken"]["state"] == "broken" and "login refused" in rows["rabbitmq:broken"]["reason"]
        text = appliance.cli("status").stdout
        assert "rabbitmq:broken [broken.toml]: BROKEN: " in text and "serves: " in text

        # the entry removed: its queue is no longer pulled
        (creds / "main.toml").unlink()
        wait_for("runners to drop the source", lambda: all(
            "rabbitmq:main" not in (s["serves"] or {}) for s in appliance.status()["slots"]), timeout=30)
        key2, body = marker_request(store, ws_key, marker, seconds=0.1)
        publish(rabbit.url, queue, body)
        time.sleep(2)
        assert key2 not in {k for _, k, _ in marker_lines(marker)}
        assert rabbit.queue_depths()[queue] == (1, 0)
        assert slot_pids(appliance) == before
    finally:
        stop_home(appliance)


def test_no_supervisord_is_logged_and_retried_not_a_crash(home, caplog):
    c = Controller(home, scan=FakeScan(gpu(0)), apply=True)  # nothing listens on the socket
    with caplog.at_level("WARNING"):
        c.poll_gpus()
        c.reconcile()
        c.reconcile()
    assert c.pending
    assert sum("supervisord not answering" in r.message for r in caplog.records) == 1
