"""The exactly-once ledger (appliance/runner/ledger.py): its claim-path policy as a table, and
end to end on a real store, real runner processes, real SIGKILLs and a real RabbitMQ restart:
a planted result record changes nothing, a redelivered message never starts a second run, kills
from outside are interruptions (not failures), a cancelled request is settled unrun, and a request
naming an unreachable store is dead-lettered within its attempts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from appliance.runner import ledger
from appliance.runner.ledger_stores import LEDGER_BUCKET
from tests.realparts import free_port
from tests.test_runner_loop import (HELLO, claimed, configure_store, dead_reasons, make_runner, output_of,
                                    pending, read_status, request, scratch, start_runner, submit, wait_for)
from tests.test_runner_loop import home as home  # noqa: F401  (the fixture)

NOW = 1_000_000.0
ME, OTHER = "box-me", "box-other"


# ------------------------------------------------------------------ the policy, as a table

def rec(state, appliance=OTHER, heartbeat=NOW - 10, **kw):
    return {"state": state, "appliance": appliance, "heartbeat": heartbeat, **kw}


@pytest.mark.parametrize("record, here, finished, verdict", [
    (None, False, False, ledger.RUN),
    (None, True, False, ledger.HOLD),  # its job folder is locked here: a second copy of a running job
    (rec("done"), False, False, ledger.SETTLE),
    (rec("failed"), True, False, ledger.SETTLE),
    (rec("running", cancel={"by": "ann"}), False, False, ledger.CANCEL),
    (rec("running"), False, False, ledger.HOLD),  # another box runs it, heartbeat fresh
    (rec("running", heartbeat=NOW - 1000), False, False, ledger.INTERRUPTED),  # that box went quiet
    (rec("running", appliance=ME), False, False, ledger.INTERRUPTED),  # ours, lock free: its runner died
    (rec("running", appliance=ME), True, False, ledger.HOLD),
    (rec("ended", heartbeat=NOW - 1000, finished=NOW - 100), False, False, ledger.HOLD),  # uploads wait there
    (rec("ended", heartbeat=NOW - 1000, finished=NOW - 5000), False, False, ledger.INTERRUPTED),
    (rec("ended", appliance=ME), False, True, ledger.INTERRUPTED),  # ours: the uploads resume here
    (rec("released"), False, False, ledger.RUN),
])
def test_decide(record, here, finished, verdict):
    assert ledger.decide(record, running_here=here, me=ME, now=NOW, stale_s=180, store_wait_s=1800,
                         finished_here=finished) == verdict


@pytest.mark.parametrize("attempt, interruptions, reason", [
    (3, 0, None),
    (4, 0, "claimed 3 times without finishing (the limit is runner.max_attempts = 3)"),
    (6, 5, None),  # five kills from outside and one run: not the job's fault
    (9, 5, "claimed 3 times without finishing, besides 5 interruption(s)"),
    (12, 11, "interrupted 11 times"),
])
def test_limits_count_interruptions_apart(attempt, interruptions, reason):
    got = ledger.over_limits(attempt, {"interruptions": interruptions}, max_attempts=3, max_interruptions=10)
    if reason is None:
        assert got is None
    else:
        assert reason in got and got.endswith("[class: infrastructure]")


# ------------------------------------------------------------------ where it lives (issue 18.4)

def plant(store, key, record: dict) -> None:
    """What any submitter can do with the client key every request carries."""
    store.scoped_client().put_object(Bucket=store.bucket, Key=f"experiments/{key}/appliance-result.json",
                                     Body=json.dumps(record).encode())


def test_a_planted_done_record_does_not_stop_the_request_from_running(store, home):
    configure_store(home, store)
    key, body = request(store, HELLO)
    plant(store, key, {"state": "done", "outcome": "success", "reason": "", "experiment": key})
    submit(home, body)
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    assert "hello from the workload" in output_of(store, key)
    assert read_status(home, "slot-0")["last_result"]["outcome"] == "success"
    assert pending(home) == [] and claimed(home) == [] and dead_reasons(home) == []


def test_a_planted_failed_record_does_not_dead_letter_the_request(store, home):
    configure_store(home, store)
    key, body = request(store, HELLO)
    plant(store, key, {"state": "done", "outcome": "failed", "reason": "ATTACKER SAYS NO", "class": "user",
                       "experiment": key})
    submit(home, body)
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    assert dead_reasons(home) == []
    assert "hello from the workload" in output_of(store, key)


def test_the_ledger_is_the_appliances_own_and_a_second_box_trusts_it(store, home, tmp_path):
    """The record is in the ledger bucket, which the client key can neither write nor read; a
    box that shares the store settles the same request from it without running it."""
    configure_store(home, store)
    runs = scratch(home) / "runs"
    key, body = request(store, {"train.py": f"open({str(runs)!r}, 'a').write('ran\\n')"})
    submit(home, body)
    make_runner(home)[0].run_forever(exit_when_idle=True)
    names = [o["Key"] for o in store.client().list_objects_v2(Bucket=LEDGER_BUCKET).get("Contents", [])]
    (name,) = [n for n in names if key in n]
    record = json.loads(store.client().get_object(Bucket=LEDGER_BUCKET, Key=name)["Body"].read())
    assert record["state"] == "done" and record["bucket"] == store.bucket and record["experiment"] == key
    for attempt in (lambda c: c.put_object(Bucket=LEDGER_BUCKET, Key=name, Body=b"{}"),
                    lambda c: c.get_object(Bucket=LEDGER_BUCKET, Key=name)):
        with pytest.raises(ClientError):
            attempt(store.scoped_client())

    from appliance.paths import Home
    other = Home.at(tmp_path / "other-box")
    other.ensure()
    configure_store(other, store)
    submit(other, body)  # the same request, redelivered to another box
    runner, _ = make_runner(other)
    runner.run_forever(exit_when_idle=True)
    assert runs.read_text() == "ran\n"
    assert runner.status.data["last_result"]["reason"].startswith("already ran")
    assert pending(other) == [] and dead_reasons(other) == []


def test_a_cancelled_request_is_settled_unrun(store, home):
    configure_store(home, store)
    runs = scratch(home) / "runs"
    key, body = request(store, {"train.py": f"open({str(runs)!r}, 'a').write('ran\\n')"})
    assert ledger.record_cancel(body, "ann", home=home)
    assert not ledger.record_cancel(body, "ann", home=home)  # recorded already: left alone
    submit(home, body)
    runner, _ = make_runner(home)
    runner.run_forever(exit_when_idle=True)
    assert not runs.exists()
    assert pending(home) == [] and claimed(home) == [] and dead_reasons(home) == []  # settled unrun, acked
    last = runner.status.data["last_result"]
    assert last["outcome"] == "cancelled" and last["reason"] == "cancelled by ann before it ran"


# ------------------------------------------------------------------ an unreachable endpoint (issue 18.7)

def test_a_request_naming_an_unreachable_store_is_dead_lettered_within_its_attempts(store, home):
    key, body = request(store, HELLO, endpoint=f"http://127.0.0.1:{free_port()}")
    submit(home, body)
    runner, _ = make_runner(home, max_attempts=3, store_backoff_s=0.01, store_backoff_max_s=0.01)
    deadline = time.monotonic() + 120
    while not dead_reasons(home) and time.monotonic() < deadline:
        runner.run_once() or time.sleep(0.05)
    (reason,) = dead_reasons(home)
    assert "store unavailable" in reason and "tried 3 times" in reason and "[class: infrastructure]" in reason
    assert pending(home) == [] and claimed(home) == []


# ------------------------------------------------------------------ kills from outside (issue 19.4)

def test_a_job_whose_runner_is_killed_five_times_still_completes_once(store, home):
    starts = scratch(home) / "starts"
    key, body = request(store, {"train.py": f"""
        import time
        with open({str(starts)!r}, "a") as f:
            f.write("start\\n")
        if open({str(starts)!r}).read().count("start") <= 5:
            time.sleep(600)
        print("completed", flush=True)
        """})
    submit(home, body)
    for i in range(1, 6):
        runner = start_runner(home, "slot-x")
        try:
            wait_for(lambda: dead_reasons(home) or (starts.exists() and starts.read_text().count("start") == i
                                                    and (read_status(home, "slot-x") or {}).get("workload")),
                     f"run {i} to start")
            assert dead_reasons(home) == []
            workload = read_status(home, "slot-x")["workload"]["pid"]
        finally:
            runner.kill()  # SIGKILL, as an OOM killer or an operator would
            runner.wait()
        wait_for(lambda: not Path(f"/proc/{workload}").exists(), "the orphaned workload to die")
    runner = start_runner(home, "slot-x")
    try:
        wait_for(lambda: dead_reasons(home) or (read_status(home, "slot-x") or {}).get("last_result"), "the last run")
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(60) == 0
    finally:
        runner.kill()
        runner.wait()
    assert dead_reasons(home) == []
    assert read_status(home, "slot-x")["last_result"]["outcome"] == "success"
    assert starts.read_text().count("start") == 6 and output_of(store, key).count("completed") == 1
    assert pending(home) == [] and claimed(home) == []


# ------------------------------------------------------------------ a broker restart mid-job (issue 19.3)

def restart_rabbit(r) -> None:
    from tests.rabbitmq_fixtures import SERVER, management_answers, stop_rabbit
    stop_rabbit(r)
    log = open(r.root / "server.log", "ab")
    r.process = subprocess.Popen([SERVER], env=r.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: management_answers(r.management), "RabbitMQ to come back")


def test_a_rabbitmq_restart_mid_job_does_not_run_the_job_twice(store, home, tmp_path):
    from appliance.queues.rabbitmq import publish
    from tests.rabbitmq_fixtures import marker_lines, marker_request, start_rabbit, stop_rabbit, \
        upload_marker_workspace

    rabbit = start_rabbit(tmp_path / "rabbitmq")
    runners = []
    try:
        queue = f"rmq_restart_{int(time.time())}"
        marker = scratch(home) / "marker.log"
        ws_key = upload_marker_workspace(store, tmp_path)
        key, body = marker_request(store, ws_key, marker, seconds=25)
        publish(rabbit.url, queue, body)
        home.credentials_dir.mkdir(parents=True, exist_ok=True)
        (home.credentials_dir / "broker.toml").write_text(rabbit.credential())
        runners = [start_runner(home, "slot-a"), start_runner(home, "slot-b")]
        wait_for(lambda: [w for w, k, _ in marker_lines(marker) if w == "start"], "the job to start")
        restart_rabbit(rabbit)  # mid-job: the message comes back redelivered while the job runs
        wait_for(lambda: [w for w, k, _ in marker_lines(marker) if w == "done"], "the job to finish", timeout=120)
        wait_for(lambda: rabbit.queue_depths().get(queue) == (0, 0), "the message to be settled", timeout=120)
        lines = marker_lines(marker)
        assert [w for w, k, _ in lines if w == "start"] == ["start"], lines  # 0 duplicate runs
        assert [w for w, k, _ in lines if w == "done"] == ["done"]
        assert f"{queue}.dead" not in rabbit.queue_depths()
    finally:
        for r in runners:
            r.send_signal(signal.SIGTERM)
        for r in runners:
            try:
                r.wait(60)
            except subprocess.TimeoutExpired:
                r.kill()
                r.wait()
        stop_rabbit(rabbit)


def test_record_cancel_leaves_a_finished_request_as_it_ended(tmp_path):
    from appliance.paths import Home
    h = Home.at(tmp_path / "h")
    h.ensure()
    led = ledger.Ledger.for_home(h)
    led.write({"experiment": "k", "bucket": "b", "state": "done", "outcome": "success"})
    assert ledger.cancel(h, "b", "k", by="ann") is None
    assert "cancel" not in led.read("b", "k")


# ------------------------------------------------------------------ an SQS visibility timeout (issue 19.3)

def test_a_message_visible_again_mid_job_is_held_not_run_twice(store, home, sqs_endpoint):
    """SQS hands the message out again when its visibility ends while the job still runs (here
    after 2 s; the keepalive would come after a minute): the second slot holds it until the first
    run settles, then it is settled from the ledger. One run."""
    import threading

    from appliance.queues.sqs import SqsSource, SqsSpec
    from appliance.runner.runner import Runner
    from tests.test_runner_loop import fast_settings
    from tests.test_sqs import sqs_client

    runs = scratch(home) / "runs"
    runs.touch()
    runs.chmod(0o666)  # each slot's workload runs as its own account
    key, body = request(store, {"train.py": f"""
        import time
        open({str(runs)!r}, "a").write("start\\n")
        time.sleep(12)
        print("finished", flush=True)
        """})
    client = sqs_client(sqs_endpoint)
    name = f"ledger-visibility-{uuid.uuid4().hex[:6]}"  # not sqs_*: other tests' runners list those
    url = client.create_queue(QueueName=name)["QueueUrl"]
    client.send_message(QueueUrl=url, MessageBody=body.decode())
    spec = SqsSpec(access_key="testing", secret_key="testing", region="us-east-1", endpoint_url=sqs_endpoint,
                   queues=(name,), visibility_s=2)
    runners = [Runner(home, slot, [SqsSource(f"sqs:{slot}", spec)], fast_settings(), environ=dict(os.environ))
               for slot in ("slot-a", "slot-b")]
    threads = [threading.Thread(target=r.run_forever) for r in runners]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: "finished" in (runs.exists() and output_of_or_none(store, key) or ""), "the job to finish",
                 timeout=120)

        def settled():
            attrs = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
            return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"]) == 0
        wait_for(settled, "the message to be settled", timeout=60)
    finally:
        for r in runners:
            r.request_stop()
        for t in threads:
            t.join(60)
        queues = client.list_queues().get("QueueUrls", [])
        for q in queues:
            if name in q:
                client.delete_queue(QueueUrl=q)
    assert runs.read_text() == "start\n"  # 0 duplicate runs
    assert not [q for q in queues if q.endswith(f"{name}_dead")]


def output_of_or_none(store, key):
    try:
        return output_of(store, key)
    except Exception:  # noqa: BLE001 - not uploaded yet
        return None


def test_one_key_in_two_members_buckets_is_two_requests(tmp_path):
    """Per-member buckets: the ledger record and the job folder are keyed by (bucket, key), so
    member B's request is not settled by member A's run of the same experiment key."""
    import dataclasses

    from appliance.paths import Home
    from appliance.studioml.request import parse_request

    h = Home.at(tmp_path / "h")
    h.ensure()
    a = parse_request((Path(__file__).parent / "fixtures" / "studioml-request.json").read_bytes())
    b = dataclasses.replace(a, artifacts={n: dataclasses.replace(x, bucket="member-b") for n, x in a.artifacts.items()})
    led = ledger.Ledger.for_home(h, me=ME)
    led.settled(led.running(a, "slot-0", 1, None), {"outcome": "success", "reason": ""})
    assert led.look(h, a, 1800)[0] == ledger.SETTLE
    assert led.look(h, b, 1800) == (ledger.RUN, None)
    assert ledger.job_folder(a) != ledger.job_folder(b)
