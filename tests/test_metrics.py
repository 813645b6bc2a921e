"""Prometheus metrics: a real appliance runs jobs and its controller's /metrics shows them in a
form `promtool` accepts; a taken metrics port is reported and breaks nothing else."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import urllib.request

import pytest

from appliance.config import ConfigError, parse_config
from appliance.paths import Home
from appliance.runner.counters import SlotCounters, read_counters
from tests.appliance_fixtures import last_result, make_home, stop_home, submit
from tests.realparts import need, wait_for


def test_a_bad_listen_value_names_the_key_and_the_fix():
    assert parse_config('[metrics]\nlisten = ""').metrics.listen == ""
    assert parse_config("").metrics.listen == "127.0.0.1:9464"
    with pytest.raises(ConfigError, match=r"metrics\.listen = '9464'.*HOST:PORT \(e\.g\. 127\.0\.0\.1:9464\)"):
        parse_config('[metrics]\nlisten = "9464"')
    with pytest.raises(ConfigError, match=r"metrics\.listen.*70000 is above 65535"):
        parse_config('[metrics]\nlisten = "127.0.0.1:70000"')


def test_runner_counters_survive_a_runner_restart(tmp_path):
    home = Home.at(tmp_path)
    cache = {"hits": 2, "misses": 1, "hit_bytes": 200, "miss_bytes": 100}
    first = SlotCounters(home, "slot-0", artifact_cache=cache)
    first.job_started("local", enqueued=None)
    first.job_finished("local", "success", started=None)
    # a new runner of the slot: its own live counts start at zero, the file's are kept
    second = SlotCounters(home, "slot-0", artifact_cache={"hits": 1, "misses": 0, "hit_bytes": 50, "miss_bytes": 0})
    second.job_started("local", enqueued=None)
    second.job_finished("local", "failed", started=None)
    data = read_counters(home, "slot-0")
    assert data["jobs_started"] == {"local": 2}
    assert data["jobs_finished"] == {"local": {"success": 1, "failed": 1}}
    assert data["artifact_cache"] == {"hits": 3, "misses": 1, "hit_bytes": 250, "miss_bytes": 100}


def test_gpu_use_and_rebalances_by_cause(tmp_path, monkeypatch):
    """GPU figures come from NVML (faked at the pynvml boundary) labelled with their slot;
    re-plans are counted by cause from events.jsonl, other events are not."""
    import pynvml
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from appliance.config import Config
    from appliance.controller import log_event
    from appliance.metrics import Collector, Sampler
    from appliance.plan import Plan, Slot
    from tests.fake_nvml.shim import fake_gpu, install, write_gpus

    for name in dir(pynvml):  # put the real functions back afterwards
        if name.startswith("nvml"):
            monkeypatch.setattr(pynvml, name, getattr(pynvml, name))
    gpus_json = tmp_path / "gpus.json"
    write_gpus(gpus_json, [fake_gpu(1, util=37)])
    install(gpus_json)
    home = Home.at(tmp_path / "home")
    home.ensure()
    home.plan_file.write_text(Plan(slots=(
        Slot("gpu-0", "gpu", (0,), (0,), 1 << 30, 1 << 28, ("GPU-fake-0001",), (0,)),)).to_json())
    log_event(home, "GPU 0 (GPU-fake-0001) lost", removed=["gpu-0"], kind="gpus")
    log_event(home, "GPU 0 (GPU-fake-0001) appeared", added=["gpu-0"], kind="gpus")
    log_event(home, "config changed (appliance.toml)", changed=["cpu-0"], kind="config")
    log_event(home, "queue sources changed: +rmq", sources={"rmq": "ok"})  # no slot moved

    sampler = Sampler(home, Config())
    sampler.latest = sampler.sample()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(home, sampler))
    text = generate_latest(registry).decode()
    labels = '{gpu="0",slot="gpu-0",uuid="GPU-fake-0001"}'
    assert _samples(text, "appliance_gpu_utilization_ratio") == {labels: 0.37}
    assert _samples(text, "appliance_gpu_memory_total_bytes") == {labels: float(8 << 30)}
    assert _samples(text, "appliance_rebalances_total") == {'{cause="config"}': 1.0, '{cause="gpus"}': 2.0}
    log_event(home, "GPU 0 (GPU-fake-0001) lost", removed=["gpu-0"], kind="gpus")
    again = generate_latest(registry).decode()  # read on from where the last scrape stopped
    assert _samples(again, "appliance_rebalances_total")['{cause="gpus"}'] == 3.0


def test_the_sampler_rests_while_nothing_scrapes_and_a_scrape_wakes_it(tmp_path, monkeypatch):
    """Nobody scraping: the store, the brokers and NVML are not asked every 15 s; the first
    scrape after that wakes the sampler, so the next one is fresh."""
    import time

    from appliance import metrics_sampler
    from appliance.config import Config
    from appliance.metrics_sampler import Sampler

    monkeypatch.setattr(metrics_sampler, "UNWATCHED_AFTER_S", 0.3)
    monkeypatch.setattr(metrics_sampler, "UNWATCHED_EVERY_S", 3600.0)
    sampler = Sampler(Home.at(tmp_path / "home"), Config(), every_s=0.05)
    asked = []
    monkeypatch.setattr(sampler, "sample", lambda: asked.append(time.monotonic()) or {"time": time.time()})
    sampler.start()
    try:
        wait_for("the sampler to slow down", lambda: sampler._slow, timeout=10)
        resting = len(asked)
        time.sleep(0.5)  # ten sampling periods
        assert len(asked) == resting
        sampler.latest  # a scrape
        wait_for("the sampler to ask again", lambda: len(asked) > resting, timeout=10)
    finally:
        sampler.stop()


# ---------------------------------------------------------------- a real appliance



def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            return resp.read().decode()
    except OSError:
        return None


def _samples(text: str, name: str) -> dict[str, float]:
    """{label text: value} of every sample of `name` (without the family's other series)."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    home = make_home(tmp_path_factory.mktemp("metrics"))  # it serves metrics on a free port
    port = int(re.search(r'listen = "127\.0\.0\.1:(\d+)"', home.home.config_file.read_text()).group(1))
    home.cli("up", "--timeout", "90")
    yield home, port
    stop_home(home)


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "job.py").write_text(
        "import sys, time\n"
        "end = time.process_time() + 0.5\n"  # some CPU time for the slot's cgroup to count
        "while time.process_time() < end:\n"
        "    pass\n"
        "sys.exit(int(sys.argv[1]))\n")
    return ws


@pytest.mark.integration
def test_metrics_show_jobs_by_outcome_and_slot_cpu_time_and_pass_promtool(metered, workspace):
    promtool = shutil.which("promtool")
    need(promtool is not None, "promtool (Debian package prometheus)")
    appliance, port = metered
    ok = submit(appliance, workspace, "job.py", "0")
    bad = submit(appliance, workspace, "job.py", "1")
    assert wait_for("the good job", lambda: last_result(appliance, ok), timeout=300)["outcome"] == "success"
    assert wait_for("the failing job", lambda: last_result(appliance, bad), timeout=300)["outcome"] == "failed"

    text = wait_for("/metrics", lambda: _scrape(port))
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr + text

    finished = _samples(text, "appliance_jobs_finished_total")
    by_outcome = {}
    for labels, n in finished.items():
        outcome = re.search(r'outcome="([^"]*)"', labels).group(1)
        by_outcome[outcome] = by_outcome.get(outcome, 0) + n
    assert by_outcome.get("success") == 1 and by_outcome.get("failed") == 1, finished
    assert sum(_samples(text, "appliance_jobs_started_total").values()) == 2
    assert sum(_samples(text, "appliance_job_duration_seconds_count").values()) == 2
    assert sum(_samples(text, "appliance_job_wait_seconds_count").values()) == 2
    assert max(_samples(text, "appliance_slot_cpu_seconds_total").values()) > 0
    assert max(_samples(text, "appliance_slot_memory_used_bytes").values()) > 0
    slots = [s["name"] for s in appliance.status()["slots"]]
    info = _samples(text, "appliance_slot_info")
    assert sorted(re.search(r'slot="([^"]*)"', k).group(1) for k in info) == sorted(slots)
    assert 'kind="cpu"' in next(iter(info))
    states = _samples(text, "appliance_slot_state")
    assert sum(v for k, v in states.items() if 'state="idle"' in k) == len(slots)  # both jobs are over
    misses = sum(_samples(text, "appliance_env_cache_misses_total").values())
    hits = sum(_samples(text, "appliance_env_cache_hits_total").values())
    assert misses >= 1 and hits + misses == 2  # the same (empty) requirements: built once per slot at most
    assert sum(_samples(text, "appliance_artifact_cache_misses_total").values()) >= 1
    assert sum(_samples(text, "appliance_artifact_cache_miss_bytes_total").values()) > 0
    assert _samples(text, "appliance_queue_source_up") == {'{kind="local",source="local"}': 1.0}
    # the sampler looks every 15 s; its first look may have been before the store was up
    wait_for("the store to be up", lambda: _samples(_scrape(port) or "", "appliance_store_up") == {"": 1.0},
             timeout=60)
    depths = wait_for("the queue depths", lambda: _samples(_scrape(port) or "", "appliance_queue_messages"))
    assert depths and all(v == 0 for k, v in depths.items() if 'state="waiting"' in k), depths


@pytest.mark.integration
def test_a_taken_metrics_port_is_reported_and_nothing_else_breaks(metered, workspace):
    appliance, _port = metered
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        appliance.cli("config", "set", "metrics.listen", f"127.0.0.1:{busy}")  # the controller follows it

        def reported():
            doctor = appliance.cli("doctor", check=False)
            return doctor if "in use" in doctor.stdout + doctor.stderr else None

        doctor = wait_for("doctor to report the taken port", reported, timeout=60)
        text = doctor.stdout + doctor.stderr
        row = next(line for line in text.splitlines() if f"127.0.0.1:{busy}" in line)
        assert "metrics" in row and "in use" in row and "metrics.listen" in row, text
        log = (appliance.home.logs_dir / "controller.log").read_text()
        assert f"cannot serve metrics on 127.0.0.1:{busy}: the port is in use" in log
        # the controller and the slots go on
        key = submit(appliance, workspace, "job.py", "0")
        assert wait_for("a job", lambda: last_result(appliance, key), timeout=300)["outcome"] == "success"
        assert all(s["state"] == "RUNNING" for s in appliance.status()["slots"])


@pytest.mark.integration
def test_rabbitmq_depths_come_from_one_management_api_call(rabbit):
    """waiting (ready), running (held by a runner), dead (`<queue>.dead`), from a real broker."""
    import uuid

    from appliance.queues.depths import rabbit_depths
    from appliance.queues.rabbitmq import RabbitSource, RabbitSpec, publish

    q = f"rmq_{uuid.uuid4().hex[:8]}"
    for body in (b"1", b"2", b"3"):
        publish(rabbit.url, q, body)
    spec = RabbitSpec(url=rabbit.url, management=rabbit.management)
    src = RabbitSource("rabbitmq:t", spec)
    try:
        src.queues()
        src.dead_letter(src.claim(q), "testing")
        assert src.claim(q) is not None  # held: running
        want = [("rabbitmq:t", q, "dead", 1), ("rabbitmq:t", q, "running", 1), ("rabbitmq:t", q, "waiting", 1)]
        # the management API refreshes its figures every few seconds
        wait_for("the broker's figures", lambda: [r for r in rabbit_depths("rabbitmq:t", spec) if r[1] == q] == want,
                 timeout=60, every=1.0)
    finally:
        src.close()


def test_sqs_depths_come_from_queue_attributes(sqs_endpoint, tmp_path):
    """waiting (visible), running (received, not yet deleted), dead (`<queue>_dead`), from a
    local SQS-compatible server."""
    import uuid

    from appliance.queues.depths import sqs_depths
    from appliance.queues.sources import read_entries
    from tests.test_sqs import sqs_client, write_entry

    client = sqs_client(sqs_endpoint)
    q = f"sqs_{uuid.uuid4().hex[:8]}"
    url = client.create_queue(QueueName=q)["QueueUrl"]
    dead = client.create_queue(QueueName=f"{q}_dead")["QueueUrl"]
    for body in ("1", "2"):
        client.send_message(QueueUrl=url, MessageBody=body)
    client.send_message(QueueUrl=dead, MessageBody="3")
    assert client.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=300)["Messages"]
    write_entry(tmp_path / "aws", sqs_endpoint)
    [entry] = read_entries(tmp_path)
    rows = sorted(r for r in sqs_depths("sqs:aws", entry.spec) if r[1] == q)
    assert rows == [("sqs:aws", q, "dead", 1), ("sqs:aws", q, "running", 1), ("sqs:aws", q, "waiting", 1)]
