"""`queue ls`, `status` and `top` list every queue source with its depth: local, RabbitMQ and
SQS, from the moment the credential entry appears (no restart, no controller needed)."""

from __future__ import annotations

import json
import uuid

import pytest

from appliance.actions.top import render_top
from appliance.cli import main
from appliance.paths import Home
from appliance.queues.local import LocalQueueSource
from appliance.status import format_status, gather
from tests.realparts import wait_for


@pytest.fixture
def home(tmp_path) -> Home:
    h = Home.at(tmp_path / "home")
    h.ensure()
    LocalQueueSource(h.queue_root, watch=False).enqueue("local_a", b"{}")
    return h


def queue_rows(home, capsys) -> list:
    assert main(["--home", str(home.root), "queue", "ls", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_an_sqs_queue_shows_once_its_entry_appears(home, sqs_endpoint, capsys):
    from tests.test_sqs import sqs_client

    client = sqs_client(sqs_endpoint)
    q = f"sqs_{uuid.uuid4().hex[:8]}"
    url = client.create_queue(QueueName=q)["QueueUrl"]
    try:
        sqs_queue_shows(home, capsys, client, url, q, sqs_endpoint)
    finally:
        client.delete_queue(QueueUrl=url)  # moto's queues outlive the server, in this process


def sqs_queue_shows(home, capsys, client, url, q, sqs_endpoint):
    from tests.test_sqs import write_entry

    for body in ("1", "2"):
        client.send_message(QueueUrl=url, MessageBody=body)
    assert {r["source"] for r in queue_rows(home, capsys)} == {"local"}

    write_entry(home.credentials_dir / "aws", sqs_endpoint)
    rows = {(r["source"], r["queue"]): r for r in queue_rows(home, capsys)}
    assert rows[("local", "local_a")]["waiting"] == 1
    got = rows[("sqs:aws", q)]
    assert (got["waiting"], got["running"], got["dead"], got["problem"]) == (2, 0, 0, "")

    assert main(["--home", str(home.root), "queue", "ls"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert ["sqs:aws", q, "2", "0", "0", "0"] in [line.split() for line in table]

    facts = gather(home)
    assert f"sqs:aws/{q}: 2 waiting, 0 running, 0 dead" in format_status(facts)
    facts.update(sampled=0, gpu_usage={})
    for s in facts["slots"]:
        s.update(cpu_used=None, last_line="")
    assert f"  sqs:aws/{q}: 2 waiting, 0 running, 0 dead" in render_top(facts, 200)


def test_a_source_that_does_not_answer_says_why(home, capsys):
    from tests.realparts import free_port

    (home.credentials_dir / "lab.toml").write_text(
        f'url = "amqp://guest:guest@127.0.0.1:{free_port()}/%2f"\n'
        f'management = "http://127.0.0.1:{free_port()}"\n')
    (home.credentials_dir / "broken.toml").write_text("url = 'http://u:secret@h/'\n")
    rows = {r["source"]: r for r in queue_rows(home, capsys)}
    assert rows["rabbitmq:lab"]["waiting"] is None
    assert "cannot ask it" in rows["rabbitmq:lab"]["problem"]
    assert "AMQP URL" in rows["rabbitmq:broken"]["problem"]
    assert "secret" not in rows["rabbitmq:broken"]["problem"] and "u:***@" in rows["rabbitmq:broken"]["problem"]
    assert main(["--home", str(home.root), "queue", "ls"]) == 0
    assert "rabbitmq:lab: cannot ask it" in capsys.readouterr().out


@pytest.mark.integration
def test_a_rabbitmq_queue_shows_with_its_depth(home, rabbit, capsys):
    from appliance.queues.rabbitmq import publish

    q = f"rmq_{uuid.uuid4().hex[:8]}"
    for body in (b"1", b"2", b"3"):
        publish(rabbit.url, q, body)
    (home.credentials_dir / "lab.toml").write_text(
        f'url = "{rabbit.url}"\nmanagement = "{rabbit.management}"\n')

    def depth():
        row = [r for r in queue_rows(home, capsys) if (r["source"], r["queue"]) == ("rabbitmq:lab", q)]
        return row and row[0]["waiting"] == 3 and row[0]["problem"] == ""
    wait_for("the broker's figures", depth, timeout=60, every=1.0)  # refreshed every few seconds
    assert f"rabbitmq:lab/{q}: 3 waiting, 0 running, 0 dead" in format_status(gather(home))
