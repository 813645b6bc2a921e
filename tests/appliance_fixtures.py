"""A whole appliance in a temporary home, started with the real CLI (`appliance up`)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from appliance.jobs.table import FINISHED, JobTable
from appliance.paths import Home
from appliance.store.client import s3_client
from appliance.store.credentials import load_credentials
from tests.cgroup_fixtures import remove_cgroup_parent
from tests.realparts import free_port, need
from tests.store_fixtures import free_store_port


@dataclass
class ApplianceHome:
    """Runs `appliance --home ROOT ...` as a user would, with its own ports and cgroup parent."""

    root: Path
    env: dict = field(default_factory=dict)

    @property
    def home(self) -> Home:
        return Home.at(self.root)

    def cli(self, *args, check=True, timeout=180) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "appliance", "--home", str(self.root), *args],
                                env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"appliance {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def write_config(self, text: str) -> None:
        self.home.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.home.config_file.write_text(text)


def make_home(tmp_path: Path, extra_config: str = "") -> ApplianceHome:
    need(os.geteuid() == 0, "root (slots create cgroups and mount /dev/shm)")
    parent = f"appliance-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "APPLIANCE_CGROUP_PARENT": parent, "MC_CONFIG_DIR": str(tmp_path / "mc"),
           "PYTHONUNBUFFERED": "1"}
    home = ApplianceHome(tmp_path / "home", env)
    home.write_config(
        "# written by the test\n"
        "[host]\nreserved_cpus = 0\nreserved_memory = \"1GiB\"\n"
        "[slots.cpu]\nmemory = \"512MiB\"\nshm = \"64MiB\"\n"
        f"[object_store]\nport = {free_store_port()}\n"
        f"[metrics]\nlisten = \"127.0.0.1:{free_port()}\"\n"  # not the default 9464 every test home would share
        "[runner]\ndrain_timeout = \"20s\"\n" + extra_config)
    return home


def stop_home(home: ApplianceHome) -> None:
    home.cli("down", "--timeout", "120", check=False)
    remove_cgroup_parent(home.env["APPLIANCE_CGROUP_PARENT"])


# what tests read back from a running appliance


def submit(appliance, workspace, script, *args, ram="256mb"):
    result = appliance.cli("submit", "--no-freeze", "--ram", ram, "--hdd", "1gb", "--dir", str(workspace),
                           script, *args)
    key = result.stdout.strip().splitlines()[-1]
    assert key, result.stdout
    return key


def store_client(appliance):
    creds = load_credentials(appliance.home)
    port = appliance.home.config_file.read_text().split("port = ")[1].split()[0]
    return s3_client(f"http://127.0.0.1:{port}", creds.access_key, creds.secret_key)


def artifact_text(appliance, key, name="output") -> str | None:
    """All text inside the experiment's `name` artifact tar, or None while it is not there."""
    client = store_client(appliance)
    try:
        body = client.get_object(Bucket="appliance", Key=f"experiments/{key}/{name}.tar")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    except ClientError as e:  # a store that has just (re)started may answer 500 for a moment
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
            return None
        raise
    texts = []
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                texts.append(tar.extractfile(member).read().decode(errors="replace"))
    return "\n".join(texts)


def job_row(appliance, key):
    """The job's row in the box's job table (it keeps every job; runners in containers write it too)."""
    table = JobTable.of(appliance.home)
    try:
        return table.get(key)
    finally:
        table.close()


def finished_row(appliance, key):
    """The job's row once it has ended, else None. A slot's status shows only its last result,
    which the next job on that slot replaces (two back to back, 20 ms apart): wait on this."""
    row = job_row(appliance, key)
    return row if row is not None and row.state in FINISHED else None


def last_result(appliance, key):
    """The job's result once it has ended: its slot's last result, else (the next job on that
    slot has replaced it: two jobs back to back, 20 ms apart) the result record it left in the
    store, once the job table says it ended; None while it has not."""
    for slot in appliance.status()["slots"]:
        result = slot.get("last_result") or {}
        if result.get("experiment") == key:
            return result
    if finished_row(appliance, key) is None:
        return None
    client = store_client(appliance)
    try:
        body = client.get_object(Bucket="appliance", Key=f"experiments/{key}/appliance-result.json")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return json.loads(body)


@pytest.fixture
def appliance_home(tmp_path):
    home = make_home(tmp_path)
    yield home
    stop_home(home)


@pytest.fixture(scope="module")
def running_appliance(tmp_path_factory):
    """One appliance brought up once for a module's tests."""
    home = make_home(tmp_path_factory.mktemp("appliance"))
    home.cli("up", "--timeout", "90")
    yield home
    stop_home(home)
