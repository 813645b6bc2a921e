"""Several appliances on one queue (issue 8): a request no slot of a box can run goes back for
the other boxes instead of being dead-lettered, the box leaves it alone for a while (no spin),
and it is dead-lettered only when enough distinct appliances refused it or it has been refused
for too long. Real RabbitMQ, real moto SQS server; two homes stand in for two appliances."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pika

from appliance.actions.submit import build_request
from appliance.identity import appliance_id
from appliance.paths import Home
from appliance.queues import refusals
from appliance.queues.local import LocalQueueSource
from appliance.queues.rabbitmq import ATTEMPTS_HEADER, RabbitSource, RabbitSpec, publish
from appliance.runner.runner import Runner, RunnerSettings

REPO = Path(__file__).resolve().parent.parent


def body(gpus=1, ram="128mb", key=None) -> tuple[str, bytes]:
    """A StudioML request; its store is never reached (nothing here runs it)."""
    key = key or f"exp-{uuid.uuid4().hex[:10]}"
    resources = {"cpus": 1, "gpus": gpus, "ram": ram, "hdd": "10mb", "gpuMem": "8gb" if gpus else "0gb"}
    data = build_request(key=key, script="train.py", script_args=[], workspace_key="blobstore/x.tar",
                         workspace_dir="/client/ws", endpoint="http://127.0.0.1:9", bucket="b",
                         access_key="a", secret_key="s", region="us-east-1", resources=resources,
                         max_duration=None, lifetime=None, save_every="3m", env={}, pip=[], pythonenv=[],
                         pythonver="3.11", studioml_home=Path("/client/.studioml"), now=time.time())
    return key, json.dumps(data).encode()


def cpu_home(path: Path, slots=("slot-0",)) -> Home:
    """An appliance home whose plan has CPU slots only (1 CPU, 1 GiB each)."""
    home = Home.at(path)
    home.ensure()
    home.plan_file.write_text(json.dumps({"slots": [
        {"name": n, "kind": "cpu", "cpus": [0], "mems": [0], "memory_bytes": 1 << 30,
         "shm_bytes": 1 << 28, "gpus": [], "gpu_indexes": []} for n in slots]}))
    return home


def runner(home, src, slot="slot-0", **kw) -> Runner:
    settings = RunnerSettings(python=sys.executable, idle_wait_s=0.2, tick_s=0.05, **kw)
    return Runner(home, slot, [src], settings, environ=dict(os.environ))


def counting(src):
    """Count the real claims a source makes (each still goes to the broker)."""
    calls = []
    real = src.claim

    def claim(queue):
        calls.append(queue)
        return real(queue)
    src.claim = claim
    return calls


def rabbit_source(rabbit, queues) -> RabbitSource:
    return RabbitSource("rabbitmq:shared", RabbitSpec(url=rabbit.url, management=rabbit.management,
                                                      queues=tuple(queues)))


def peek(rabbit, queue):
    """(headers, body) of the one message in `queue`, put back as it was (taken and published
    again: a nack would mark it redelivered, which the runner counts as a lost claim)."""
    conn = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    try:
        ch = conn.channel()
        ch.tx_select()
        method, props, data = ch.basic_get(queue, auto_ack=False)
        if method is None:
            return None
        ch.basic_publish("", queue, data, props)
        ch.basic_ack(method.delivery_tag)
        ch.tx_commit()
        return props.headers or {}, data
    finally:
        conn.close()


def take(rabbit, queue):
    conn = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    try:
        method, props, data = conn.channel().basic_get(queue, auto_ack=True)
        return None if method is None else (props.headers or {}, data)
    finally:
        conn.close()


def wait_depth(rabbit, queue, want, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rabbit.queue_depths().get(queue) == want:
            return True
        time.sleep(0.1)
    return rabbit.queue_depths().get(queue) == want


# ---------------------------------------------------------------- the rule itself

def test_the_same_appliance_counts_once_and_enough_distinct_ones_dead_letter():
    record = refusals.add({}, "box-a", "needs 1 gpus, slot has 0", now=100.0)
    record = refusals.add(record, "box-a", "needs 1 gpus, slot has 0", now=200.0)
    assert list(record["by"]) == ["box-a"] and record["first"] == 100.0
    assert refusals.unrunnable(record, after_refusals=2, after_s=3600, now=200.0) is None
    record = refusals.add(record, "box-b", "needs 1 gpus, slot has 0", now=300.0)
    reason = refusals.unrunnable(record, after_refusals=2, after_s=3600, now=300.0)
    assert "2 appliance(s) refused it" in reason and "box-a: needs 1 gpus" in reason and "box-b" in reason
    # the age rule counts from the first refusal; 0 switches it off
    assert "unrunnable_after" in refusals.unrunnable(record, 5, after_s=3600, now=100.0 + 3600)
    assert refusals.unrunnable(record, 5, after_s=0, now=1e12) is None
    assert refusals.parse(refusals.dump(record)) == record
    assert refusals.parse("not json") == {} and refusals.parse(None) == {}


def test_backoff_per_message_doubles_up_to_its_cap():
    b = refusals.Backoff(first_s=30, max_s=100)
    delays = [b.refused("m", "s", "q", "k", "why", [], now=0.0).delay for _ in range(4)]
    assert delays == [30, 60, 100, 100]
    assert b.waiting("m", now=50.0) and not b.waiting("m", now=101.0) and not b.waiting("other", now=0.0)


def test_the_appliance_id_is_made_once_and_differs_between_homes(tmp_path):
    a, b = Home.at(tmp_path / "a"), Home.at(tmp_path / "b")
    first = appliance_id(a)
    assert first == appliance_id(a) == a.appliance_id_file.read_text().strip()
    assert appliance_id(b) != first and first.startswith(os.uname().nodename[:10])


# ---------------------------------------------------------------- RabbitMQ

def test_a_box_that_cannot_run_a_request_gives_it_back_and_does_not_spin_on_it(rabbit, tmp_path):
    """A CPU-only box on a shared queue holding only a GPU request: the request stays on the
    queue (not dead-lettered), uncounted, marked refused by this box; the runner then leaves the
    queue alone instead of claiming it again and again, and its other queues are still served."""
    gpu_q, other_q = f"rmq_gpu_{uuid.uuid4().hex[:6]}", f"rmq_other_{uuid.uuid4().hex[:6]}"
    key, data = body(gpus=1)
    publish(rabbit.url, gpu_q, data)
    publish(rabbit.url, other_q, b"{}")  # declare it (this one is malformed: dead-lettered at once)
    take(rabbit, other_q)
    home = cpu_home(tmp_path / "cpu-box")
    src = rabbit_source(rabbit, [gpu_q, other_q])
    claims = counting(src)
    r = runner(home, src)
    loop = threading.Thread(target=r.run_forever)
    loop.start()
    try:
        assert wait_depth(rabbit, gpu_q, (1, 0))
        deadline = time.monotonic() + 3  # some 15 idle turns of the runner
        while time.monotonic() < deadline:
            time.sleep(0.1)
        gpu_claims = claims.count(gpu_q)
        assert 1 <= gpu_claims <= 2, claims  # the old runner: dead-lettered; a spinning one: ~15+
        assert rabbit.queue_depths()[gpu_q] == (1, 0) and f"{gpu_q}.dead" not in rabbit.queue_depths()
        headers, got = peek(rabbit, gpu_q)
        assert got == data and headers[ATTEMPTS_HEADER] == 0  # a refusal is no attempt
        record = refusals.parse(headers[refusals.HEADER])
        assert record["by"] == {appliance_id(home): "needs 1 gpus, slot has 0"}

        # the other queue is not starved while the GPU queue is left alone
        publish(rabbit.url, other_q, b"not json")
        assert wait_depth(rabbit, f"{other_q}.dead", (1, 0))
        assert claims.count(gpu_q) == gpu_claims

        # `appliance queue ls` says what waits that this box cannot run, and why
        out = json.loads(subprocess.run([sys.executable, "-m", "appliance", "--home", str(home.root),
                                         "queue", "ls", "--json"], cwd=REPO, capture_output=True,
                                        text=True, check=True).stdout)
        row = next(r for r in out if r["queue"] == gpu_q)
        assert row["source"] == "rabbitmq:shared" and row["refused"] == 1
        assert row["cannot_run"] == [{"experiment": key, "reason": "needs 1 gpus, slot has 0",
                                      "refused_by": [appliance_id(home)]}]
        text = subprocess.run([sys.executable, "-m", "appliance", "--home", str(home.root), "queue", "ls"],
                              cwd=REPO, capture_output=True, text=True, check=True).stdout
        assert f"{gpu_q} {key}: needs 1 gpus, slot has 0" in text
    finally:
        r.request_stop()
        loop.join(30)
    assert wait_depth(rabbit, gpu_q, (1, 0))  # stopping gave nothing away


def test_a_new_message_wakes_a_queue_of_refused_ones(rabbit, tmp_path):
    """The quiet queue is looked at again as soon as something arrives there."""
    q = f"rmq_mixed_{uuid.uuid4().hex[:6]}"
    publish(rabbit.url, q, body(gpus=1)[1])
    home = cpu_home(tmp_path / "cpu-box")
    src = rabbit_source(rabbit, [q])
    r = runner(home, src)
    try:
        assert r.next_message() is None  # refused, the queue goes quiet
        assert r.next_message() is None and rabbit.queue_depths()[q] == (1, 0)
        publish(rabbit.url, q, b"garbage")
        assert r.next_message() is None
        assert wait_depth(rabbit, f"{q}.dead", (1, 0)) and rabbit.queue_depths()[q] == (1, 0)
    finally:
        src.close()


def test_refusals_count_distinct_appliances_then_dead_letter_with_who_and_why(rabbit, tmp_path):
    q = f"rmq_nobody_{uuid.uuid4().hex[:6]}"
    key, data = body(gpus=2)
    publish(rabbit.url, q, data)
    a = cpu_home(tmp_path / "box-a", slots=("slot-0", "slot-1"))
    b = cpu_home(tmp_path / "box-b")
    sources = [rabbit_source(rabbit, [q]) for _ in range(3)]
    a0 = runner(a, sources[0], "slot-0", unrunnable_after_refusals=2)
    a1 = runner(a, sources[1], "slot-1", unrunnable_after_refusals=2)
    b0 = runner(b, sources[2], "slot-0", unrunnable_after_refusals=2)
    try:
        assert a0.run_once() is False
        assert a1.run_once() is False  # another slot of the same box: still one appliance
        headers, _ = peek(rabbit, q)
        assert list(refusals.parse(headers[refusals.HEADER])["by"]) == [appliance_id(a)]
        assert f"{q}.dead" not in rabbit.queue_depths()
        assert b0.run_once() is False  # a second appliance: 2 distinct, the limit
        assert wait_depth(rabbit, f"{q}.dead", (1, 0)) and rabbit.queue_depths()[q] == (0, 0)
        headers, got = take(rabbit, f"{q}.dead")
        reason = headers["x-appliance-reason"]
        assert got == data
        assert reason.startswith("no appliance serving this queue can run it: 2 appliance(s) refused it")
        assert f"{appliance_id(a)}: needs 2 gpus, slot has 0" in reason and appliance_id(b) in reason
        assert "unrunnable_after_refusals = 2" in reason
    finally:
        for s in sources:
            s.close()


def test_a_request_refused_for_too_long_is_dead_lettered(rabbit, tmp_path):
    q = f"rmq_old_{uuid.uuid4().hex[:6]}"
    _key, data = body(gpus=1)
    publish(rabbit.url, q, b"")  # declares and binds the queue like the client
    take(rabbit, q)
    old = {"first": time.time() - 7200, "by": {"box-elsewhere": "needs 1 gpus, slot has 0"}}
    conn = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    conn.channel().basic_publish("", q, data, pika.BasicProperties(
        delivery_mode=2, headers={refusals.HEADER: refusals.dump(old)}))
    conn.close()
    home = cpu_home(tmp_path / "box")
    src = rabbit_source(rabbit, [q])
    r = runner(home, src, unrunnable_after_refusals=5, unrunnable_after_s=3600)
    try:
        assert r.run_once() is False
        assert wait_depth(rabbit, f"{q}.dead", (1, 0))
        reason = take(rabbit, f"{q}.dead")[0]["x-appliance-reason"]
        assert "since it was first refused (queues.unrunnable_after = 3600s)" in reason
        assert "box-elsewhere" in reason and appliance_id(home) in reason
    finally:
        src.close()


# ---------------------------------------------------------------- local queue: one box

def test_the_local_queue_still_dead_letters_at_once(tmp_path):
    home = cpu_home(tmp_path / "box")
    src = LocalQueueSource(home.queue_root, runner_id="slot-0")
    src.enqueue("local_q", body(gpus=1)[1])
    r = runner(home, src)
    assert r.run_once() is False
    (dead,) = src.dead_letters()
    assert dead[2] == "no slot of this appliance can run it: needs 1 gpus, slot has 0 [class: user]"
    assert not refusals.read_all(home)


# ---------------------------------------------------------------- SQS

def test_sqs_refusals_travel_with_the_copy_and_dead_letter_after_two_boxes(sqs_endpoint, tmp_path):
    from appliance.queues.sqs import SqsSource, parse_sqs_dir
    from tests.test_sqs import sqs_client, write_entry

    client = sqs_client(sqs_endpoint)
    q = f"sqs_fleet_{uuid.uuid4().hex[:6]}"
    url = client.create_queue(QueueName=q)["QueueUrl"]
    _key, data = body(gpus=1)
    client.send_message(QueueUrl=url, MessageBody=data.decode())
    write_entry(tmp_path / "aws", sqs_endpoint)
    spec = parse_sqs_dir(tmp_path / "aws")
    a, b = cpu_home(tmp_path / "box-a"), cpu_home(tmp_path / "box-b")
    src_a, src_b = SqsSource("sqs:aws", spec), SqsSource("sqs:aws", spec)
    ra = runner(a, src_a, unrunnable_after_refusals=2)
    rb = runner(b, src_b, unrunnable_after_refusals=2)
    try:
        claims = counting(src_a)
        assert ra.run_once() is False
        first_pass = len(claims)  # the message, then "nothing else there"
        assert ra.run_once() is False  # quiet: the copy is back, and this box leaves it alone
        assert len(claims) == first_pass
        got = client.receive_message(QueueUrl=url, MessageAttributeNames=["All"], AttributeNames=["All"],
                                     VisibilityTimeout=0)["Messages"][0]
        assert got["Body"] == data.decode()
        assert got["MessageAttributes"]["appliance-attempts"]["StringValue"] == "0"  # not an attempt
        record = refusals.parse(got["MessageAttributes"][refusals.ATTRIBUTE]["StringValue"])
        assert list(record["by"]) == [appliance_id(a)]
        assert rb.run_once() is False
        dead = client.get_queue_url(QueueName=f"{q}_dead")["QueueUrl"]
        [gone] = client.receive_message(QueueUrl=dead, MessageAttributeNames=["All"])["Messages"]
        reason = gone["MessageAttributes"]["reason"]["StringValue"]
        assert "2 appliance(s) refused it" in reason and appliance_id(a) in reason and appliance_id(b) in reason
        assert "Messages" not in client.receive_message(QueueUrl=url, WaitTimeSeconds=0)
    finally:
        src_a.close()
        src_b.close()




def test_a_new_plan_looks_at_refused_requests_again(rabbit, tmp_path):
    """A GPU arrives (the controller re-plans): what this box refused is not left waiting out
    its backoff; here the new GPU slot can run it, so the CPU slot holds it for that slot."""
    q = f"rmq_replan_{uuid.uuid4().hex[:6]}"
    publish(rabbit.url, q, body(gpus=1)[1])
    home = cpu_home(tmp_path / "box", slots=("slot-0",))
    src = rabbit_source(rabbit, [q])
    claims = counting(src)
    r = runner(home, src)
    try:
        assert r.next_message() is None and not r.held_back  # refused
        seen = claims.count(q)  # (the broker's other rmq_ queues are served too)
        assert r.next_message() is None and claims.count(q) == seen  # left alone
        plan = json.loads(home.plan_file.read_text())
        plan["slots"].append({**plan["slots"][0], "name": "slot-gpu", "kind": "gpu", "gpus": ["GPU-1"]})
        home.plan_file.write_text(json.dumps(plan))
        assert r.next_message() is None
        assert claims.count(q) > seen and r.held_back  # looked at again: now it is the GPU slot's
        assert rabbit.queue_depths()[q] == (1, 0)
    finally:
        src.close()
