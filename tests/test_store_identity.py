"""The store's two identities: the admin one stays in the appliance; clients (s3.env, the mc
alias) and the requests `appliance submit` queues carry a client identity scoped to the
appliance's buckets. A real SeaweedFS store."""

from __future__ import annotations

import json
import uuid

import pytest
from botocore.exceptions import ClientError

from appliance.cli import main
from appliance.config import load_config
from appliance.lifecycle import write_client_settings
from appliance.paths import Home
from appliance.queues.local import LocalQueueSource
from appliance.studioml.request import parse_request
from appliance.store.credentials import (STUDIOML_META_BUCKET, ensure_credentials, load_client_credentials,
                                         load_credentials)


def denied(call) -> bool:
    with pytest.raises(ClientError) as err:
        call()
    return err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_the_client_identity_works_in_its_bucket_only(store):
    client, admin = store.scoped_client(), store.client()
    key = f"id/{uuid.uuid4()}"
    client.put_object(Bucket=store.bucket, Key=key, Body=b"mine")
    assert client.get_object(Bucket=store.bucket, Key=key)["Body"].read() == b"mine"
    assert key in [o["Key"] for o in client.list_objects_v2(Bucket=store.bucket, Prefix="id/")["Contents"]]
    client.delete_object(Bucket=store.bucket, Key=key)  # its own outputs: runners replace them

    other = f"other-{uuid.uuid4().hex[:8]}"
    admin.create_bucket(Bucket=other)
    admin.put_object(Bucket=other, Key="secret", Body=b"not yours")
    assert denied(lambda: client.get_object(Bucket=other, Key="secret"))
    assert denied(lambda: client.put_object(Bucket=other, Key="x", Body=b"x"))
    assert denied(lambda: client.list_objects_v2(Bucket=other))
    assert denied(lambda: client.delete_object(Bucket=other, Key="secret"))
    assert denied(lambda: client.create_bucket(Bucket=f"new-{uuid.uuid4().hex[:8]}"))
    assert denied(lambda: client.delete_bucket(Bucket=store.bucket))
    assert denied(lambda: client.delete_bucket(Bucket=other))
    assert admin.get_object(Bucket=other, Key="secret")["Body"].read() == b"not yours"
    assert other not in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_the_client_may_use_the_studioml_records_bucket_once_up_made_it(store):
    """The StudioML client (examples/studioml/config.yaml) keeps its records in studioml-meta:
    it lists the buckets and creates that one only when it is missing."""
    from appliance.store.client import ensure_bucket

    # what `up` does with the admin keys (another test on this store may have made it already)
    ensure_bucket(store.endpoint_url, store.access_key, store.secret_key, STUDIOML_META_BUCKET)
    client = store.scoped_client()
    assert STUDIOML_META_BUCKET in [b["Name"] for b in client.list_buckets()["Buckets"]]
    client.put_object(Bucket=STUDIOML_META_BUCKET, Key="experiments/k", Body=b"{}")
    assert client.get_object(Bucket=STUDIOML_META_BUCKET, Key="experiments/k")["Body"].read() == b"{}"



def test_s3_env_and_the_mc_alias_hold_the_client_identity(store_home, tmp_path, monkeypatch):
    monkeypatch.setenv("MC_CONFIG_DIR", str(tmp_path / "mc"))
    write_client_settings(store_home, load_config(store_home.config_file))
    admin, client = load_credentials(store_home), load_client_credentials(store_home)
    assert admin != client
    env = (store_home.secrets_dir / "s3.env").read_text()
    alias = json.loads((tmp_path / "mc" / "config.json").read_text())["aliases"]["appliance"]
    assert f"AWS_ACCESS_KEY_ID={client.access_key}\n" in env and alias["accessKey"] == client.access_key
    for text in (env, json.dumps(alias)):
        assert admin.access_key not in text and admin.secret_key not in text


def test_a_submitted_request_carries_no_admin_key(store_home, store, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('hi')\n")
    assert main(["--home", str(store_home.root), "submit", "--dir", str(project), "--no-freeze",
                 "--queue", "local_identity", "train.py"]) == 0
    src = LocalQueueSource(store_home.queue_root, watch=False)
    msg = src.claim("local_identity")
    admin, client = load_credentials(store_home), load_client_credentials(store_home)
    assert admin.access_key not in msg.body.decode() and admin.secret_key not in msg.body.decode()
    ws = parse_request(msg.body).artifacts["workspace"]
    assert (ws.access_key, ws.secret_key) == (client.access_key, client.secret_key)
    # and those keys are enough for the runner: the workspace reads back
    assert store.scoped_client().head_object(Bucket=ws.bucket, Key=ws.key)["ContentLength"] > 0


def test_an_external_store_has_no_generated_client_identity(tmp_path):
    """Nothing makes identities on an external store: clients get the admin keys, unless the
    user puts a `client` entry in store.json."""
    home = Home.at(tmp_path / "ext")
    home.ensure()
    admin = ensure_credentials(home)  # what `prepare` does for kind = "external"
    assert "client" not in json.loads(home.store_credentials.read_text())
    assert load_client_credentials(home) == admin
    doc = json.loads(home.store_credentials.read_text())
    doc["client"] = {"access_key": "CLIENTKEY", "secret_key": "CLIENTSECRET"}
    home.store_credentials.write_text(json.dumps(doc))
    assert load_client_credentials(home).access_key == "CLIENTKEY"
    assert load_credentials(home) == admin


def test_an_older_store_json_gains_a_client_identity_and_keeps_its_admin_keys(tmp_path):
    home = Home.at(tmp_path / "old")
    home.ensure()
    home.store_credentials.write_text(json.dumps({"access_key": "ADMINKEY", "secret_key": "ADMINSECRET"}))
    admin = ensure_credentials(home, with_client=True)
    assert (admin.access_key, admin.secret_key) == ("ADMINKEY", "ADMINSECRET")
    client = load_client_credentials(home)
    assert client.access_key not in ("ADMINKEY", "") and client.secret_key
    assert home.store_credentials.stat().st_mode & 0o777 == 0o600
    assert ensure_credentials(home, with_client=True) == admin and load_client_credentials(home) == client
