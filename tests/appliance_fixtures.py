"""A whole appliance in a temporary home, started with the real CLI (`appliance up`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.paths import Home
from tests.cgroup_fixtures import remove_cgroup_parent
from tests.realparts import need
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
        "[runner]\ndrain_timeout = \"20s\"\n" + extra_config)
    return home


def stop_home(home: ApplianceHome) -> None:
    home.cli("down", "--timeout", "120", check=False)
    remove_cgroup_parent(home.env["APPLIANCE_CGROUP_PARENT"])


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
