"""The bundled store: authenticated requests work, wrong keys are refused."""

import os
import uuid

import pytest
from botocore.exceptions import ClientError

from appliance.store.client import s3_client


def test_store_accepts_its_credentials_and_keeps_data(store):
    client = store.client()
    key = f"t/{uuid.uuid4()}"
    client.put_object(Bucket=store.bucket, Key=key, Body=b"hello")
    assert client.get_object(Bucket=store.bucket, Key=key)["Body"].read() == b"hello"


@pytest.mark.parametrize("access,secret", [("right", "wrong"), ("unknown", "whatever")])
def test_store_refuses_wrong_credentials(store, access, secret):
    if access == "right":
        access = store.access_key
    client = s3_client(store.endpoint_url, access, secret, attempts=1)
    with pytest.raises(ClientError) as err:
        client.list_objects_v2(Bucket=store.bucket)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_store_refuses_anonymous(store):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{store.endpoint_url}/{store.bucket}?list-type=2", timeout=5)
    assert err.value.code == 403


def test_a_new_store_keeps_its_metadata_in_one_leveldb(store):
    """The layout that lets the store rest (appliance/store/server.py filer_store_environment):
    one leveldb, not leveldb2's eight shards whose reserved buffers kept Go's collector busy."""
    assert (store.home.store_data / "filerldb" / "CURRENT").is_file()
    sharded = store.home.store_data / "filerldb2"
    assert not sharded.exists() or not any(sharded.iterdir())  # weed makes it, empty
    environ = open(f"/proc/{_weed_pid(store)}/environ", "rb").read().split(b"\0")
    assert b"WEED_LEVELDB_ENABLED=true" in environ and b"GOMEMLIMIT=256MiB" in environ


def test_a_store_made_by_an_older_appliance_keeps_its_objects(tmp_path):
    """A home whose metadata is in leveldb2 (every store before this layout) stays on it:
    switching would hide every object it holds."""
    from tests.store_fixtures import start_store, stop_store

    root = tmp_path / "old"
    (root / "store" / "filerldb2").mkdir(parents=True)  # what an older appliance left
    first = start_store(root)
    key = f"t/{uuid.uuid4()}"
    try:
        first.client().put_object(Bucket=first.bucket, Key=key, Body=b"kept")
    finally:
        stop_store(first)
    again = start_store(root)
    try:
        assert again.client().get_object(Bucket=again.bucket, Key=key)["Body"].read() == b"kept"
        assert not (again.home.store_data / "filerldb").exists()
        assert (again.home.store_data / "filerldb2" / "00" / "CURRENT").is_file()
        environ = open(f"/proc/{_weed_pid(again)}/environ", "rb").read().split(b"\0")
        assert b"GOMEMLIMIT=384MiB" in environ  # its shards' buffers on top of memory_limit
    finally:
        stop_store(again)


def test_a_store_made_by_weed_mini_keeps_its_objects(tmp_path):
    """Stores made before the appliance ran `weed server` ran `weed mini` on the same folder:
    the new command finds their objects, the volume size mini chose, and the SSE-S3 key mini
    kept beside them (an object stored encrypted stays readable)."""
    import subprocess
    import time

    from appliance.paths import Home
    from appliance.store.client import check_store
    from appliance.store.credentials import ensure_credentials, write_identities
    from appliance.store.server import filer_store_environment, seaweed_ports, volume_size_limit_mb, weed_binary
    from tests.store_fixtures import free_store_port, start_store, stop_store

    root = tmp_path / "old"
    home = Home.at(root)
    home.ensure()
    creds = ensure_credentials(home, with_client=True)
    write_identities(home, "appliance")
    port = free_store_port()
    ports = seaweed_ports(port)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    mini = subprocess.Popen(
        [weed_binary(), "-logtostderr", "mini", f"-dir={home.store_data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
         f"-s3.port={port}", f"-admin.port={port + 4}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
         "-admin.ui=false", f"-s3.config={home.store_identities}", "-bucket=appliance", "-master.telemetry=false"],
        env={"PATH": "/usr/bin:/bin", "TMPDIR": str(scratch), **filer_store_environment(home, 256 * 1024 * 1024)},
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(300):
            if check_store(endpoint, creds.access_key, creds.secret_key, "appliance") is None:
                break
            time.sleep(0.2)
        old = s3_client(endpoint, creds.access_key, creds.secret_key)
        old.put_object(Bucket="appliance", Key="plain", Body=b"kept")
        old.put_object(Bucket="appliance", Key="sealed", Body=b"kept sealed", ServerSideEncryption="AES256")
        time.sleep(3)  # mini writes mini.options once every part is up
    finally:
        mini.terminate()
        mini.wait(30)
    chosen = {k: v for k, _, v in (line.partition("=") for line in (home.store_data / "mini.options").read_text().split())}
    assert volume_size_limit_mb(home.store_data) == int(chosen["master.volumeSizeLimitMB"])

    again = start_store(root)
    try:
        client = again.client()
        assert client.get_object(Bucket="appliance", Key="plain")["Body"].read() == b"kept"
        assert client.get_object(Bucket="appliance", Key="sealed")["Body"].read() == b"kept sealed"
        assert b"-filer" in open(f"/proc/{_weed_pid(again)}/cmdline", "rb").read().split(b"\0")
    finally:
        stop_store(again)


def test_a_memory_limit_the_store_cannot_rest_in_is_refused(tmp_path):
    from appliance.config import Config, ObjectStoreConfig
    from appliance.paths import Home
    from appliance.store.server import StoreError, store_program

    config = Config(object_store=ObjectStoreConfig(memory_limit=128 * 1024 * 1024))
    with pytest.raises(StoreError, match="object_store.memory_limit.*appliance config set"):
        store_program(Home.at(tmp_path / "home"), config)


def _weed_pid(store) -> int:
    """The `weed` process below the store's sandbox."""
    with open(f"/proc/{store.process.pid}/task/{store.process.pid}/children") as f:
        return int(f.read().split()[0])


def test_the_health_check_of_a_healthy_store_needs_no_boto3_and_a_wrong_key_is_still_explained(store):
    """The controller asks every 15 s (metrics): a store that answers as expected costs it
    neither boto3's ~20 MB nor a client per check; a wrong key is still explained."""
    import json
    import subprocess
    import sys

    def check(secret: str) -> tuple:
        probe = ("import json, sys\nfrom appliance.store.client import check_store\n"
                 "print(json.dumps([check_store(*sys.argv[1:5]), 'boto3' in sys.modules]))\n")
        out = subprocess.run([sys.executable, "-c", probe, store.endpoint_url, store.access_key, secret,
                              store.bucket], capture_output=True, text=True, timeout=120)
        return tuple(json.loads(out.stdout.strip().splitlines()[-1]))

    assert check(store.secret_key) == (None, False)
    problem, _ = check("wrong")  # told on the quick path too, in boto3's words
    assert "refused the appliance's credentials" in problem


def test_the_stores_secret_is_made_once_and_kept(tmp_path):
    """The SSE-S3 key the wrapper hands the store: made whole the first time, the owner's alone,
    the same at every later start (a new key would leave encrypted objects unreadable)."""
    import os

    from appliance.store.sandbox import secret_environment

    path = tmp_path / ".mini_sse_kek"
    first = secret_environment([f"WEED_S3_SSE_KEK={path}"])
    assert len(first["WEED_S3_SSE_KEK"]) == 64 and (path.stat().st_mode & 0o777) == 0o600
    assert secret_environment([f"WEED_S3_SSE_KEK={path}"]) == first
    assert os.listdir(tmp_path) == [".mini_sse_kek"]
    path.write_text("")  # emptied: made again, as `weed mini` did
    assert secret_environment([f"WEED_S3_SSE_KEK={path}"]) != first


def test_a_reload_keeps_the_store_running(tmp_path):
    """SIGHUP to the store's wrapper (a member identity was made) has the store read its
    identities again; it is not a stop: the same store still answers after the wrapper's kill
    timer would have fired (it used to SIGKILL the store 5 s after each reload)."""
    import signal
    import time

    from appliance.store.sandbox import Store
    from tests.store_fixtures import start_store, stop_store

    running = start_store(tmp_path / "home")
    try:
        weed = _weed_pid(running)
        running.process.send_signal(signal.SIGHUP)
        time.sleep(Store.KILL_AFTER_S + 2)
        assert running.process.poll() is None and _weed_pid(running) == weed
        assert running.client().list_objects_v2(Bucket=running.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
    finally:
        stop_store(running)


def _context_switches(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    return total


def test_a_store_started_again_over_its_data_rests_and_keeps_every_object(tmp_path):
    """A store restarted (and killed) over its own data keeps its objects and takes new ones,
    and rests like a new one. SeaweedFS's raft "fast resume" left a restarted master ticking
    every millisecond (~2,700 context switches/s, 3 % of a core); a resting store makes ~50/s."""
    import time

    from tests.store_fixtures import free_store_port, start_store, stop_store

    root, objects, port = tmp_path / "home", {}, free_store_port()  # its port, as `up` keeps it
    for round_ in range(3):
        running = start_store(root, port=port)
        try:
            client = running.client()
            for i in range(20):
                key = f"t/{round_}/{i}"
                objects[key] = os.urandom(3000)
                client.put_object(Bucket=running.bucket, Key=key, Body=objects[key])
            for key, body in objects.items():
                assert client.get_object(Bucket=running.bucket, Key=key)["Body"].read() == body, key
            if round_ == 2:
                weed = _weed_pid(running)
                time.sleep(2)
                before = _context_switches(weed)
                time.sleep(5)
                assert _context_switches(weed) - before < 5 * 400, "the restarted store does not rest"
        finally:
            if round_ == 1:
                running.process.kill()  # its weed dies with it (PDEATHSIG)
                running.process.wait()
            stop_store(running)
