"""The store's health check (status, doctor, /metrics, notifications) as the controller runs it
every few seconds: a well store, and one that is not up (yet), are told without boto3, so the
long-lived controller never carries it; every other answer is still explained in boto3's words."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_a_store_that_is_not_up_is_told_without_boto3_in_its_words(store_home, store):
    port = free_port()
    store_home.config_file.write_text(f'[object_store]\nport = {port}\nbucket = "{store.bucket}"\n')
    assert health(store_home) == {"boto3": False, "problem": (
        f"cannot reach the object store at http://127.0.0.1:{port}: Could not connect to the endpoint URL: "
        f"\"http://127.0.0.1:{port}/{store.bucket}\"; is it running? (`appliance status`)")}


def test_other_answers_are_explained_by_boto3(store_home, store):
    text = store_home.config_file.read_text()
    store_home.config_file.write_text(text.replace(f'bucket = "{store.bucket}"', 'bucket = "no-such-bucket-here"'))
    assert health(store_home) == {"boto3": True, "problem": (
        f"bucket 'no-such-bucket-here' does not exist at {store.endpoint_url}: `appliance up` creates it")}
