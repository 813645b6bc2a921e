"""SQS queue source against a local SQS-compatible server (moto in server mode: real HTTP on
127.0.0.1), reached through a credentials folder's endpoint override."""

from __future__ import annotations

import time

import pytest

from appliance.paths import Home
from appliance.queues.sources import SourceSet, check_entry, read_entries
from appliance.queues.sqs import SqsSource, parse_sqs_dir
from tests.realparts import free_port


def write_entry(folder, endpoint: str, region: str = "us-east-1") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "credentials").write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    (folder / "config").write_text(f"[default]\nregion = {region}\nendpoint_url = {endpoint}\n")


def sqs_client(endpoint):
    import boto3

    return boto3.client("sqs", region_name="us-east-1", endpoint_url=endpoint,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def test_parse_errors_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "credentials").write_text("[default]\naws_access_key_id = x\naws_secret_access_key = y\n")
    with pytest.raises(ValueError, match="missing config"):
        parse_sqs_dir(tmp_path / "a")
    (tmp_path / "a" / "config").write_text("[default]\n")
    with pytest.raises(ValueError, match="needs region"):
        parse_sqs_dir(tmp_path / "a")
    (tmp_path / "a" / "config").write_text("")  # half-written
    with pytest.raises(ValueError, match="no \\[default\\] profile"):
        parse_sqs_dir(tmp_path / "a")
    (tmp_path / "a" / "config").write_text("[default]\nregion = eu-west-1\nqueues = sqs_a, sqs_b\n")
    spec = parse_sqs_dir(tmp_path / "a")
    assert spec.region == "eu-west-1" and spec.queues == ("sqs_a", "sqs_b") and spec.endpoint_url == ""


def test_claim_keepalive_release_ack_and_dead_letter(sqs_endpoint, tmp_path):
    client = sqs_client(sqs_endpoint)
    url = client.create_queue(QueueName="sqs_work")["QueueUrl"]
    client.create_queue(QueueName="other_queue")
    client.send_message(QueueUrl=url, MessageBody='{"n": 1}')
    write_entry(tmp_path / "local-sqs", sqs_endpoint)
    [entry] = read_entries(tmp_path)
    state, reason, queues = check_entry(entry)
    assert state == "ok" and "sqs_work" in queues and "other_queue" not in queues, reason

    src = SqsSource("sqs:local-sqs", entry.spec)
    msg = src.claim("sqs_work")
    assert msg.body == b'{"n": 1}' and msg.source == "sqs:local-sqs"
    src.keepalive(msg)
    assert src.claim("sqs_work") is None  # invisible while it runs
    src.release(msg)
    again = src.claim("sqs_work")
    assert again is not None and again.message_id == msg.message_id
    src.dead_letter(again, "bad request: testing")
    dead = client.get_queue_url(QueueName="sqs_work_dead")["QueueUrl"]
    got = client.receive_message(QueueUrl=dead, MessageAttributeNames=["All"])["Messages"][0]
    assert got["MessageAttributes"]["reason"]["StringValue"] == "bad request: testing"
    assert "sqs_work_dead" not in src.queues()

    client.send_message(QueueUrl=url, MessageBody="two")
    m2 = src.claim("sqs_work")
    src.ack(m2)
    src.close()
    assert "Messages" not in client.receive_message(QueueUrl=url)


def test_a_new_sqs_folder_is_served_live(sqs_endpoint, tmp_path):
    client = sqs_client(sqs_endpoint)
    client.create_queue(QueueName="sqs_live")
    home = Home.at(tmp_path / "home")
    home.ensure()
    sources = SourceSet(home, slot="slot-0", check_every_s=0.05)
    try:
        assert sources.queues() == []
        write_entry(home.credentials_dir / ".incoming", sqs_endpoint)  # prepared under a dot name
        (home.credentials_dir / ".incoming").rename(home.credentials_dir / "aws")
        time.sleep(0.1)
        assert sources.refresh(force=True)
        assert "sqs:aws/sqs_live" in sources.queues()
        # a folder with a wrong endpoint is broken, with the reason, and the other stays
        write_entry(home.credentials_dir / "nowhere", f"http://127.0.0.1:{free_port()}")
        time.sleep(0.1)
        sources.refresh(force=True)
        assert "sqs:aws/sqs_live" in sources.queues()
        assert "nowhere" in sources.broken and "127.0.0.1" in sources.broken["nowhere"].reason
    finally:
        sources.close()


def test_attempts_count_receives_and_survive_a_dead_runner(sqs_endpoint, tmp_path):
    """Issue 13: a runner that dies holding a message is counted (SQS counts the receive), and a
    look that never started the work can be given back uncounted."""
    import dataclasses

    from appliance.queues.base import over_attempts

    client = sqs_client(sqs_endpoint)
    url = client.create_queue(QueueName="sqs_attempts")["QueueUrl"]
    client.send_message(QueueUrl=url, MessageBody='{"n": 7}',
                        MessageAttributes={"origin": {"DataType": "String", "StringValue": "client"}})
    write_entry(tmp_path / "e", sqs_endpoint)
    spec = dataclasses.replace(parse_sqs_dir(tmp_path / "e"), visibility_s=1)
    src = SqsSource("sqs:e", spec)
    try:
        first = src.claim("sqs_attempts")
        assert (first.attempt, first.body) == (1, b'{"n": 7}')
        src.release(first)
        second = src.claim("sqs_attempts")
        assert second.attempt == 2
        src.release(second, counted=False)  # held back for another slot: not an attempt
        third = src.claim("sqs_attempts")
        assert (third.attempt, third.body) == (2, b'{"n": 7}')
        assert third.message_id != second.message_id  # the uncounted copy is a new SQS message
        assert src._attributes[third.message_id]["origin"]["StringValue"] == "client"  # kept
        src.release(third)
        # the runner holding it dies: nobody settles or extends it
        dead_runner = SqsSource("sqs:e", spec)
        held = dead_runner.claim("sqs_attempts")
        assert held.attempt == 3
        del dead_runner
        again = None
        deadline = time.monotonic() + 30
        while again is None and time.monotonic() < deadline:
            again = src.claim("sqs_attempts")
            time.sleep(0.2)
        assert (again.attempt, again.body) == (4, b'{"n": 7}')
        assert over_attempts(again, 3).startswith("claimed 3 times without finishing")
        src.dead_letter(again, over_attempts(again, 3))
        assert "Messages" not in client.receive_message(QueueUrl=url, WaitTimeSeconds=0)
        dead = client.get_queue_url(QueueName="sqs_attempts_dead")["QueueUrl"]
        got = client.receive_message(QueueUrl=dead, MessageAttributeNames=["All"])["Messages"]
        assert len(got) == 1 and got[0]["Body"] == '{"n": 7}'
        assert "claimed 3 times" in got[0]["MessageAttributes"]["reason"]["StringValue"]
    finally:
        src.close()
