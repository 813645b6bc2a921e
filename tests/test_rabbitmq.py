"""RabbitMQ queue source and the live credentials directory, against a real broker."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pika
import pytest

from appliance.paths import Home
from appliance.queues.local import enqueue
from appliance.queues.rabbitmq import RabbitSource, RabbitSpec, bound_queues, publish
from appliance.queues.sources import SourceSet, check_entry, parse_rabbit, read_entries, serving_file


def _queue() -> str:
    return f"rmq_{uuid.uuid4().hex[:8]}"


def _wait(predicate, timeout=15.0, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def test_queues_are_found_through_studioml_topic_bindings(rabbit):
    q = _queue()
    publish(rabbit.url, q, b'{"a": 1}')
    spec = RabbitSpec(url=rabbit.url, management=rabbit.management)
    assert q in bound_queues(spec)
    src = RabbitSource("rabbitmq:t", spec)
    try:
        assert q in src.queues()
        msg = src.claim(q)
        assert msg is not None and msg.body == b'{"a": 1}' and msg.queue == q
        assert src.claim(q) is None  # one message, held by us, unacked
        assert rabbit.queue_depths()[q] == (0, 1)
        src.ack(msg)
        assert _wait(lambda: rabbit.queue_depths()[q] == (0, 0))
    finally:
        src.close()


def test_release_dead_letter_and_a_dying_holder(rabbit):
    q = _queue()
    spec = RabbitSpec(url=rabbit.url, management=rabbit.management)
    for body in (b"1", b"2"):
        publish(rabbit.url, q, body)
    src = RabbitSource("rabbitmq:t", spec)
    src.queues()
    first = src.claim(q)
    src.release(first)
    again = src.claim(q)
    assert again.body in (b"1", b"2")
    src.dead_letter(again, "bad request: testing")
    other = src.claim(q)
    assert other is not None
    # the holder dies without settling: the broker hands the message out again at once
    src.conn.close()
    src.conn = None
    assert _wait(lambda: rabbit.queue_depths()[q] == (1, 0))
    dead = rabbit.queue_depths()[f"{q}.dead"]
    assert dead == (1, 0)
    conn = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    method, props, body = conn.channel().basic_get(f"{q}.dead", auto_ack=True)
    assert props.headers["x-appliance-reason"] == "bad request: testing"
    conn.close()


def test_a_long_job_moves_to_a_lease_that_returns_the_message_if_the_holder_dies(rabbit):
    """Jobs longer than lease_after no longer depend on an unacked delivery (which RabbitMQ's
    consumer_timeout would take back mid-run): a holding queue with a TTL keeps the message."""
    q = _queue()
    publish(rabbit.url, q, b"long job")
    spec = RabbitSpec(url=rabbit.url, management=rabbit.management, lease_after_s=0.3, lease_s=3.0)
    src = RabbitSource("rabbitmq:t", spec)
    src.queues()
    msg = src.claim(q)
    time.sleep(0.4)
    src.keepalive(msg)
    lease = msg.handle.lease_queue
    assert lease
    depths = rabbit.queue_depths()
    assert depths[q] == (0, 0) and depths[lease] == (1, 0)  # original acked, copy held
    time.sleep(0.4)
    src.keepalive(msg)  # renewed: a new holding queue, the old one gone
    assert msg.handle.lease_queue != lease
    assert _wait(lambda: lease not in rabbit.queue_depths())
    # the holder dies: the lease runs out and the message is back on its queue
    src.conn.close()
    assert _wait(lambda: rabbit.queue_depths()[q] == (1, 0), timeout=20)
    # and a finished leased job leaves nothing behind
    src2 = RabbitSource("rabbitmq:t2", spec)
    src2.queues()
    m2 = src2.claim(q)
    assert m2.body == b"long job" and m2.attempt == 2  # the claim that died holding the lease counts
    time.sleep(0.4)
    src2.keepalive(m2)
    src2.ack(m2)
    depths = rabbit.queue_depths()
    assert depths[q] == (0, 0) and m2.handle.lease_queue not in depths
    src2.close()


def test_parse_entries_and_their_errors(tmp_path):
    (tmp_path / "ok.toml").write_text('url = "amqp://u:p@h:5672/%2f"\nqueues = ["rmq_a"]\n')
    (tmp_path / "bare.rmq").write_text("amqp://u:p@h:5672/%2f\nhttp://h:15672\n")
    (tmp_path / "half.toml").write_text('url = "amqp://u:p@h')
    (tmp_path / "empty.toml").write_text("")
    (tmp_path / "junk.json").write_text("{}")
    (tmp_path / ".ok.toml.swp").write_text("x")
    (tmp_path / "ok.toml~").write_text("x")
    entries = {e.name: e for e in read_entries(tmp_path)}
    assert set(entries) == {"ok.toml", "bare.rmq", "half.toml", "empty.toml", "junk.json"}
    assert entries["ok.toml"].spec.queues == ("rmq_a",) and entries["ok.toml"].source_name == "rabbitmq:ok"
    assert entries["bare.rmq"].spec.management == "http://h:15672"
    assert "not valid TOML" in entries["half.toml"].error
    assert "empty" in entries["empty.toml"].error
    assert "not a queue entry" in entries["junk.json"].error
    with pytest.raises(ValueError, match="unknown key"):
        parse_rabbit('url = "amqp://h"\nmanagment = "http://h"\n')
    with pytest.raises(ValueError, match="AMQP URL"):
        parse_rabbit('url = "http://h"\n')


def test_check_entry_says_why_an_entry_is_broken(rabbit, tmp_path):
    (tmp_path / "good.toml").write_text(rabbit.credential())
    (tmp_path / "badpass.toml").write_text(rabbit.credential(password="nope"))
    (tmp_path / "noport.toml").write_text('url = "amqp://guest:guest@127.0.0.1:1/%2f"\n')
    entries = {e.name: e for e in read_entries(tmp_path)}
    assert check_entry(entries["good.toml"])[0] == "ok"
    state, reason, _ = check_entry(entries["badpass.toml"])
    assert state == "broken" and "login refused" in reason and "nope" not in reason
    state, reason, _ = check_entry(entries["noport.toml"])
    assert state == "broken" and "cannot connect" in reason


@pytest.fixture
def home(tmp_path) -> Home:
    h = Home.at(tmp_path / "home")
    h.ensure()
    return h


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # how an editor saves: arrives as a move


def test_source_set_follows_the_credentials_directory(rabbit, home):
    q = _queue()
    publish(rabbit.url, q, b"one")
    publish(rabbit.url, q, b"two")
    enqueue(home.queue_root, "local_x", b"local one")
    sources = SourceSet(home, slot="slot-9", check_every_s=0.05)
    try:
        assert sources.queues() == ["local/local_x"]
        # a broken entry next to a good one: the good one is served, the broken one reported
        (home.credentials_dir / "broken.toml").write_text(rabbit.credential(password="wrong"))
        _write_atomically(home.credentials_dir / "main.toml", rabbit.credential())
        assert _wait(lambda: sources.wait(0.2) or f"rabbitmq:main/{q}" in sources.queues(), timeout=5)
        keys = sources.queues()
        assert f"rabbitmq:main/{q}" in keys and "local/local_x" in keys
        assert "login refused" in sources.broken["broken.toml"].reason
        serving = json.loads(serving_file(home, "slot-9").read_text())
        assert q in serving["sources"]["rabbitmq:main"] and "rabbitmq:broken" in serving["broken"]

        held = sources.claim(f"rabbitmq:main/{q}")
        assert held.source == "rabbitmq:main"
        # the entry is removed while its job runs: no more claims, the job still settles
        (home.credentials_dir / "main.toml").unlink()
        time.sleep(0.1)
        sources.keepalive(held)
        assert all(not k.startswith("rabbitmq:main/") for k in sources.queues())
        assert sources.retiring and rabbit.queue_depths()[q] == (1, 1)
        sources.ack(held)
        assert not sources.retiring  # closed once its last message settled
        assert _wait(lambda: rabbit.queue_depths()[q] == (1, 0))
    finally:
        sources.close()


def test_a_half_written_entry_is_used_once_complete(rabbit, home):
    sources = SourceSet(home, slot="slot-8", check_every_s=0.05)
    try:
        entry = home.credentials_dir / "late.toml"
        entry.write_text(rabbit.credential()[:20])  # half-written, in place
        time.sleep(0.1)
        sources.refresh(force=True)
        assert "late.toml" in sources.broken and not sources.live
        entry.write_text(rabbit.credential())
        time.sleep(0.1)
        assert sources.refresh(force=True)
        assert "late.toml" in sources.live
        # the directory deleted: only the local queue is left, nothing raises
        entry.unlink()
        home.credentials_dir.rmdir()
        sources.refresh(force=True)
        assert not sources.live and sources.queues() == []
    finally:
        sources.close()


# ---------------------------------------------------------------- attempts (issue 13)

HOLDER = """
import sys, time
from appliance.queues.rabbitmq import RabbitSource, RabbitSpec
src = RabbitSource("rabbitmq:doomed", RabbitSpec(url=sys.argv[1]))
msg = src.claim(sys.argv[2])
print(msg.attempt, msg.body.decode(), flush=True)
time.sleep(600)
"""


def _claim_in_a_process_then_kill_it(url: str, queue: str) -> tuple[int, str]:
    """A runner holding the message is SIGKILLed mid-job (no settle, no clean disconnect)."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, queue], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        attempt, body = proc.stdout.readline().split()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return int(attempt), body


def _one_message_in(rabbit, q) -> bool:
    ready, unacked = rabbit.queue_depths().get(q, (0, 0))
    return ready + unacked == 1


def test_attempts_travel_with_the_message_through_releases_and_crashes(rabbit):
    from appliance.queues.base import over_attempts
    from appliance.queues.rabbitmq import ATTEMPTS_HEADER

    q = _queue()
    publish(rabbit.url, q, b"job")
    spec = RabbitSpec(url=rabbit.url, management=rabbit.management)
    src = RabbitSource("rabbitmq:t", spec)
    try:
        first = src.claim(q)
        assert (first.attempt, first.body) == (1, b"job")
        src.release(first)
        second = src.claim(q)
        assert (second.message_id, second.attempt) == (first.message_id, 2)
        src.release(second, counted=False)  # only looked at: held back for another slot
        again = src.claim(q)
        assert again.attempt == 2
        # the holder's connection goes without settling: the broker hands it back, and the
        # next claim counts that lost claim before anyone works on it
        src.conn.close()
        assert _wait(lambda: rabbit.queue_depths()[q] == (1, 0))
        src = RabbitSource("rabbitmq:t", spec)
        third = src.claim(q)
        assert (third.attempt, third.body, third.message_id) == (3, b"job", first.message_id)
        src.release(third)
        # a runner SIGKILLed while it runs the message
        assert _claim_in_a_process_then_kill_it(rabbit.url, q) == (4, "job")
        assert _wait(lambda: rabbit.queue_depths()[q] == (1, 0))
        fifth = src.claim(q)
        assert fifth.attempt == 5 and _one_message_in(rabbit, q)  # counted, not copied
        assert over_attempts(fifth, 5) is None
        reason = over_attempts(fifth, 4)
        assert reason.startswith("claimed 4 times without finishing (the limit is runner.max_attempts = 4)")
        src.dead_letter(fifth, reason)
        assert _wait(lambda: rabbit.queue_depths()[q] == (0, 0) and rabbit.queue_depths()[f"{q}.dead"] == (1, 0))
        conn = pika.BlockingConnection(pika.URLParameters(rabbit.url))
        _method, props, body = conn.channel().basic_get(f"{q}.dead", auto_ack=True)
        conn.close()
        assert body == b"job" and props.headers["x-appliance-reason"] == reason
        assert props.headers[ATTEMPTS_HEADER] == 5
    finally:
        src.close()


def test_crashed_holders_lose_nothing_and_copy_nothing(rabbit):
    """Two messages held by a runner whose connection dies, a third waiting: afterwards each of
    the three is claimed exactly once, the two that were held as their second attempt."""
    q = _queue()
    for body in (b"a", b"b", b"c"):
        publish(rabbit.url, q, body)
    spec = RabbitSpec(url=rabbit.url, management=rabbit.management)
    holder = RabbitSource("rabbitmq:holder", spec)
    held = [holder.claim(q), holder.claim(q)]
    assert [m.attempt for m in held] == [1, 1]
    holder.conn.close()
    assert _wait(lambda: rabbit.queue_depths()[q] == (3, 0))
    src = RabbitSource("rabbitmq:t", spec)
    try:
        got = []
        while (m := src.claim(q)) is not None:
            got.append((m.body, m.attempt))
        assert sorted(got) == [(b"a", 2), (b"b", 2), (b"c", 1)]
        assert rabbit.queue_depths()[q] == (0, 3)
    finally:
        src.close()
    assert _wait(lambda: rabbit.queue_depths()[q] == (3, 0))  # close() puts them back
