"""The store's health check (status, doctor, /metrics, notifications) as the controller runs it
every few seconds: a well store, and one that is not up (yet), are told without boto3, so the
long-lived controller never carries it; every other answer is still explained in boto3's words."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from appliance.store import client
from appliance.store.client import PROBE_PREFIX, s3_client
from tests.realparts import free_port
from tests.test_runner_lean import REPO

PROBE = """
import json, sys
from appliance.config import load_config
from appliance.paths import Home
from appliance.store.health import store_problem
home = Home.at(sys.argv[1])
problem = store_problem(home, load_config(home.config_file), write=sys.argv[2] == "write")
print(json.dumps({"problem": problem, "boto3": "boto3" in sys.modules}))
"""


def health(home, write: bool = True) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(home.root), "write" if write else "read"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_well_store_is_told_without_boto3(store_home, store):
    assert health(store_home) == {"problem": None, "boto3": False}
    assert health(store_home, write=False) == {"problem": None, "boto3": False}
    client = s3_client(store.endpoint_url, store.access_key, store.secret_key)
    assert client.list_objects_v2(Bucket=store.bucket, Prefix=PROBE_PREFIX).get("KeyCount", 0) == 0  # deleted again


def test_a_store_that_is_not_up_or_has_no_bucket_yet_is_told_without_boto3(store_home, store):
    port = free_port()
    store_home.config_file.write_text(f'[object_store]\nport = {port}\nbucket = "{store.bucket}"\n')
    assert health(store_home) == {"boto3": False, "problem": (
        f"cannot reach the object store at http://127.0.0.1:{port}: Could not connect to the endpoint URL: "
        f"\"http://127.0.0.1:{port}/{store.bucket}\"; is it running? (`appliance status`)")}
    port = _answering_server(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    store_home.config_file.write_text(f'[object_store]\nport = {port}\nbucket = "fresh"\n')
    assert health(store_home) == {"boto3": False, "problem": (
        f"bucket 'fresh' does not exist at http://127.0.0.1:{port}: `appliance up` creates it")}


def test_other_answers_are_explained_by_boto3(store_home):
    port = _answering_server(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    store_home.config_file.write_text(f'[object_store]\nport = {port}\nbucket = "b"\n')
    got = health(store_home)
    assert got["boto3"] and got["problem"].startswith(f"http://127.0.0.1:{port} answered 503: ")


def _answering_server(answer: bytes) -> int:
    """A port whose server answers every request with `answer`."""
    import socket
    import threading
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn):
        with conn:
            while conn.recv(65536):
                conn.sendall(answer)

    def run():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1]


def _closing_server() -> int:
    """A port whose server accepts each connection and closes it unanswered (a store starting)."""
    import socket
    import threading
    listener = socket.create_server(("127.0.0.1", 0))

    def run():
        while True:
            conn, _ = listener.accept()
            conn.close()
    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1]


@pytest.mark.parametrize("case", ["well", "read only", "refused", "closed", "no bucket", "wrong secret"])
def test_the_quick_path_tells_what_boto3_tells_in_the_same_words(store, case):
    endpoint, secret, bucket = store.endpoint_url, store.secret_key, store.bucket
    if case == "refused":
        endpoint = f"http://127.0.0.1:{free_port()}"
    elif case == "closed":
        endpoint = f"http://127.0.0.1:{_closing_server()}"
    elif case == "no bucket":
        bucket = "no-such-bucket-here"
    elif case == "wrong secret":
        secret = "not-the-secret"
    args = (endpoint, store.access_key, secret, bucket, "us-east-1", case != "read only")
    quick = client._quick_check(*args)
    assert quick == (True, client._boto3_check(*args))
    assert (quick[1] is None) == (case in ("well", "read only"))
