"""Notifications: a real appliance POSTs its events to webhooks (a local HTTP server here):
one message per finished, failed and dead-lettered job and per lost GPU (NVML faked at the
pynvml boundary); a receiver answering 500 gets the message again until it takes it, once; an
unreachable one is reported by `doctor` and slows no job."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from appliance import notify
from appliance.config import ConfigError, parse_config
from appliance.paths import Home
from tests.appliance_fixtures import last_result, make_home, stop_home, submit
from tests.realparts import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST; `fail[path]` = how many to answer 500."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls: list[tuple[str, int, dict]] = []  # (path, status answered, body)
        self.fail: dict[str, int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    status = 500 if receiver.fail.get(self.path, 0) > 0 else 200
                    if status == 500:
                        receiver.fail[self.path] -= 1
                    receiver.calls.append((self.path, status, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def taken(self, path: str, event: str | None = None, key: str | None = None) -> list[dict]:
        """Bodies answered 200 at `path`, of this event and experiment if given."""
        with self.lock:
            return [b for p, s, b in self.calls if p == path and s == 200
                    and (event is None or b.get("event") == event) and (key is None or b.get("experiment") == key)]

    def tries(self, path: str, key: str) -> int:
        with self.lock:
            return sum(1 for p, _, b in self.calls if p == path and b.get("experiment") == key)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


# ------------------------------------------------------------------ config


def test_notify_config_is_validated_with_clear_errors():
    config = parse_config('[notify]\nwebhooks = ["https://hooks.slack.com/services/T/B/X", '
                          '{url = "http://127.0.0.1:9/x", events = ["job_failed", "gpu"]}]\ntries = 2\n')
    slack, mine = config.notify.webhooks
    assert slack.wants("store_down") and mine.wants("job_failed") and mine.wants("gpu_lost")
    assert not mine.wants("job_finished")
    with pytest.raises(ConfigError, match=r"notify.webhooks.*'ftp://x' is not an http:// or https:// URL"):
        parse_config('[notify]\nwebhooks = ["ftp://x"]\n')
    with pytest.raises(ConfigError, match=r"unknown event 'job_fail' \(did you mean 'job_failed'\?\)"):
        parse_config('[notify]\nwebhooks = [{url = "http://h/x", events = ["job_fail"]}]\n')
    with pytest.raises(ConfigError, match="unknown key.*secret.*a webhook has url and events"):
        parse_config('[notify]\nwebhooks = [{url = "http://h/x", secret = "s"}]\n')


def test_a_slack_webhook_gets_a_slack_message():
    event = {"event": "job_failed", "host": "box1", "text": "experiment e FAILED on slot-0: exit code 1"}
    assert json.loads(notify.body_for("https://hooks.slack.com/services/T0/B0/xyz", event)) == {
        "text": "[box1] experiment e FAILED on slot-0: exit code 1"}
    assert json.loads(notify.body_for("https://example.com/hook", event)) == event


def test_a_slack_message_shows_a_submitters_markup_literally():
    event = {"event": "job_failed", "host": "box1",
             "text": "experiment <!channel> & <https://evil.example|login> FAILED"}
    text = json.loads(notify.body_for("https://hooks.slack.com/services/T0/B0/xyz", event))["text"]
    assert text == "[box1] experiment &lt;!channel&gt; &amp; &lt;https://evil.example|login&gt; FAILED"
    assert "<" not in text and ">" not in text


# ------------------------------------------------------------------ the controller's delivery


def test_a_restarted_deliverer_neither_loses_nor_repeats_and_the_spool_is_emptied(tmp_path, receiver, monkeypatch):
    monkeypatch.setattr(notify, "COMPACT_BYTES", 1)  # empty a file as soon as it is all delivered
    home = Home.at(tmp_path / "home")
    home.ensure()
    home.config_file.write_text(f'[notify]\nwebhooks = ["{receiver.url("/r")}"]\n')
    texts = lambda: [b["text"] for b in receiver.taken("/r")]  # noqa: E731

    first = notify.Deliverer(home).start()
    wait_for("the deliverer to follow [notify]", lambda: first.workers)
    notify.emit(home, "slot-0", "job_finished", "one")
    notify.emit(home, "controller", "gpu_lost", "two")
    wait_for("two messages", lambda: len(texts()) == 2, timeout=30)
    wait_for("the delivered spool to be emptied", lambda: all(
        p.stat().st_size == 0 for p in notify.spool_dir(home).glob("*.jsonl")), timeout=30)
    first.stop()
    wait_for("the first deliverer to stop", lambda: not any(w.is_alive() for w in first.workers.values()))

    notify.emit(home, "slot-0", "job_failed", "three")  # while no controller runs
    second = notify.Deliverer(home).start()
    wait_for("the third message", lambda: len(texts()) >= 3, timeout=30)
    notify.emit(home, "slot-0", "job_finished", "four")
    wait_for("the fourth message", lambda: len(texts()) >= 4, timeout=30)
    second.stop()
    assert sorted(texts()) == ["four", "one", "three", "two"]
    assert all(b["host"] and b["time"] for b in receiver.taken("/r"))
    spool = notify.spool_dir(home)
    assert spool.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in spool.glob("*.jsonl"))


# ------------------------------------------------------------------ a real appliance

JOB = (
    "import sys\n"
    "print('working on', sys.argv[1], flush=True)\n"
    "sys.exit(int(sys.argv[1]))\n"
)


@pytest.fixture
def appliance_with_webhooks(tmp_path, receiver):
    from tests.fake_nvml.shim import fake_gpu, write_gpus

    gpus_json = tmp_path / "gpus.json"
    write_gpus(gpus_json, [fake_gpu(1)])
    dead = f"http://127.0.0.1:{free_port()}/never"
    appliance = make_home(tmp_path, f"""
[gpus]
poll_interval = "0.3s"
[slots.gpu]
cpus = 1
memory = "512MiB"
shm = "64MiB"
[notify]
tries = 3
timeout = "2s"
webhooks = [
  {{url = "{receiver.url('/all')}"}},
  {{url = "{receiver.url('/flaky')}", events = ["job_finished"]}},
  {{url = "{dead}"}},
]
""")
    appliance.env["PYTHONPATH"] = f"{REPO / 'tests' / 'fake_nvml'}:{REPO}"
    appliance.env["APPLIANCE_FAKE_NVML"] = str(gpus_json)
    receiver.fail["/flaky"] = 2
    try:
        appliance.cli("up", "--timeout", "90")
        yield appliance, gpus_json, dead
    finally:
        stop_home(appliance)


def test_events_reach_the_webhooks_once_each(appliance_with_webhooks, receiver, tmp_path):
    from appliance.queues.local import LocalQueueSource
    from tests.fake_nvml.shim import fake_gpu, write_gpus

    appliance, gpus_json, dead = appliance_with_webhooks
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "job.py").write_text(JOB)
    good = submit(appliance, ws, "job.py", "0")
    bad = submit(appliance, ws, "job.py", "1")
    malformed = f"malformed-{uuid.uuid4().hex[:8]}"
    writer = LocalQueueSource(appliance.home.queue_root, runner_id="client", watch=False)
    writer.enqueue("local_appliance", json.dumps({"experiment": {"key": malformed}}).encode())
    writer.close()

    wait_for("the three job events", lambda: receiver.taken("/all", "job_finished", good)
             and receiver.taken("/all", "job_failed", bad) and receiver.taken("/all", "job_dead_lettered", malformed),
             timeout=300)
    failed = receiver.taken("/all", "job_failed", bad)[0]
    assert "FAILED" in failed["text"] and "exit code 1" in failed["reason"], failed
    assert failed["slot"].startswith("slot-") and failed["queue"] == "local_appliance"
    dead_lettered = receiver.taken("/all", "job_dead_lettered", malformed)[0]
    assert "bad request" in dead_lettered["reason"], dead_lettered

    # the receiver that answered 500 twice got the finished job once, on the third try
    wait_for("the flaky receiver to take it", lambda: receiver.taken("/flaky", "job_finished", good), timeout=60)
    assert receiver.tries("/flaky", good) == 3
    assert receiver.taken("/flaky", "job_failed") == []  # it asked for job_finished only

    write_gpus(gpus_json, [fake_gpu(1, lost=True)])  # the GPU falls off the bus
    lost = wait_for("the gpu_lost event", lambda: receiver.taken("/all", "gpu_lost"), timeout=120)
    assert lost[0]["gpu"] == "GPU-fake-0001" and "lost" in lost[0]["text"]

    # the unreachable webhook: doctor says so, and jobs go on as before
    doctor = wait_for("doctor to report the dead webhook", lambda: (
        lambda out: out if "unreachable" in out else None)(appliance.cli("doctor", check=False).stdout), timeout=60)
    row = next(line for line in doctor.splitlines() if "notify http://127.0.0.1:" in line and "FAIL" in line)
    assert dead.rsplit("/", 1)[0] in row and "/never" not in row  # the path (a secret on Slack) is not shown
    later = submit(appliance, ws, "job.py", "0")
    wait_for("a later job's event", lambda: receiver.taken("/all", "job_finished", later), timeout=300)
    assert last_result(appliance, later)["outcome"] == "success"

    time.sleep(2)  # one more delivery round: anything sent twice would show now
    for event, key in (("job_finished", good), ("job_failed", bad), ("job_dead_lettered", malformed),
                       ("job_finished", later)):
        assert len(receiver.taken("/all", event, key)) == 1, (event, key)
    assert len(receiver.taken("/all", "gpu_lost")) == 1
    log = (appliance.home.logs_dir / "controller.log").read_text()
    assert "DROPPED after 3 tries: unreachable" in log and "/never" not in log


# ------------------------------------------------------------------ the controller's own events


def spooled(home) -> list[dict]:
    return [json.loads(line) for p in sorted(notify.spool_dir(home).glob("*.jsonl"))
            for line in p.read_text().splitlines()]


def test_a_broken_queue_source_and_a_lost_gpu_become_events(tmp_path):
    from appliance.controller import Controller
    from appliance.gpus import Gpu, GpuScan

    home = Home.at(tmp_path / "home")
    home.ensure()
    home.config_file.write_text('[host]\nreserved_cpus = 0\nreserved_memory = "1GiB"\n[slots.gpu]\ncpus = 1\n')
    card = Gpu(0, "GPU-0", "Fake", 8 << 30, None)
    scans = [GpuScan((card,)), GpuScan((Gpu(0, "unknown-0", "?", 0, None, False, "NVML: GPU is lost"),)),
             GpuScan((card,))]
    c = Controller(home, scan=lambda: scans[0], apply=False)
    c.poll_gpus()
    scans.pop(0)
    c.poll_gpus()
    scans.pop(0)
    c.poll_gpus()
    (home.credentials_dir / "broken.toml").write_text('url = "amqp://u:p@127.0.0.1:1/%2f"\n')
    c.check_credentials("credentials changed")
    c.check_credentials("credentials changed")  # still broken: no second event
    events = spooled(home)
    assert [e["event"] for e in events] == ["gpu_lost", "gpu_back", "source_broken"], events
    assert "GPU 0 (GPU-0, Fake) lost: NVML: GPU is lost" in events[0]["text"]
    assert events[2]["queue_source"] == "rabbitmq:broken" and "BROKEN" in events[2]["text"]


def test_the_store_going_down_and_back_is_one_event_each(store_home, store, receiver, monkeypatch):
    from urllib.parse import urlsplit

    monkeypatch.setattr(notify, "STORE_CHECK_S", 0.0)
    config = store_home.config_file.read_text()
    hooks = f'[notify]\nwebhooks = [{{url = "{receiver.url("/s")}", events = ["store"]}}]\n'
    store_home.config_file.write_text(config + hooks)
    d = notify.Deliverer(store_home)
    for _ in range(3):
        d.step()  # the store answers: nothing to say
    port = urlsplit(store.endpoint_url).port
    store_home.config_file.write_text(config.replace(f"port = {port}", f"port = {free_port()}") + hooks)
    for _ in range(3):
        d.step()
    store_home.config_file.write_text(config + hooks)
    for _ in range(3):
        d.step()
    assert [(e["event"], "DOWN" in e["text"]) for e in spooled(store_home)] == [("store_down", True),
                                                                                ("store_back", False)]
