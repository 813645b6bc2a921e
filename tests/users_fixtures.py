"""Real local accounts for tests of a lab of users: members of the `appliance` group and an outsider.

Each account is made with useradd (a home of its own under the test's temporary folder) and removed
with userdel at the end. The `appliance` group is made when the machine has none, as install.sh
would, and kept (as `install.sh --uninstall` keeps it): removing it would pull it from under any
other test run on this machine that uses it. `User.cli(...)` runs the real CLI as that
user with runuser: no sudo, nothing of root's environment but the path to this checkout.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.paths import SHARED_GROUP
from tests.realparts import need

REPO = Path(__file__).resolve().parent.parent


@dataclass
class User:
    name: str
    home_dir: Path
    appliance_root: Path | None = None

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.name).pw_uid

    def env(self) -> dict:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home_dir), "USER": self.name,
                "LANG": "C.UTF-8", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1",
                **({"APPLIANCE_HOME": str(self.appliance_root)} if self.appliance_root else {})}

    def run(self, *argv, timeout=180, input=None) -> subprocess.CompletedProcess:
        """`argv` as this user (runuser -u), in this checkout, with a clean environment."""
        env_args = [f"{k}={v}" for k, v in self.env().items()]
        return subprocess.run(["runuser", "-u", self.name, "--", "env", "-i", *env_args, *map(str, argv)],
                              cwd=str(self.home_dir), capture_output=True, text=True, timeout=timeout, input=input)

    def cli(self, *args, timeout=180) -> subprocess.CompletedProcess:
        """`appliance ARGS` as this user, against `appliance_root`."""
        return self.run(sys.executable, "-m", "appliance", *args, timeout=timeout)

    def python(self, code: str, timeout=120) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-c", code, timeout=timeout)


def _ensure_group() -> None:
    """Make the appliance group if missing (another run may make it at the same moment)."""
    try:
        grp.getgrnam(SHARED_GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--force", "--system", SHARED_GROUP], check=True, capture_output=True)


def _add_user(base: Path, tag: str, groups: list[str]) -> User:
    name = f"t{tag}{uuid.uuid4().hex[:6]}"
    home_dir = base / name
    cmd = ["useradd", "--create-home", "--home-dir", str(home_dir), "--shell", "/bin/sh", "--user-group"]
    if groups:
        cmd += ["--groups", ",".join(groups)]
    subprocess.run([*cmd, name], check=True, capture_output=True)
    return User(name, home_dir)


@pytest.fixture(scope="module")
def lab_users(tmp_path_factory):
    """{"alice": member, "bob": member, "eve": outsider}: three fresh accounts."""
    need(os.geteuid() == 0, "root (to create accounts and run commands as them)")
    need(all(subprocess.run(["which", t], capture_output=True).returncode == 0 for t in ("useradd", "runuser")),
         "useradd and runuser")
    _ensure_group()
    base = tmp_path_factory.mktemp("users")
    os.chmod(base, 0o755)
    users = {}
    try:
        users["alice"] = _add_user(base, "a", [SHARED_GROUP])
        users["bob"] = _add_user(base, "b", [SHARED_GROUP])
        users["eve"] = _add_user(base, "e", [])
        yield users
    finally:
        for user in users.values():
            subprocess.run(["userdel", "--force", "--remove", user.name], capture_output=True)


@pytest.fixture(scope="module")
def lab(lab_users, tmp_path_factory):
    """A running appliance and its users (the group exists before `up`: the socket is the group's);
    (ApplianceHome, {"alice", "bob", "eve"})."""
    from tests.appliance_fixtures import make_home, stop_home

    home = make_home(tmp_path_factory.mktemp("appliance"))
    home.cli("up", "--timeout", "120")
    for user in lab_users.values():
        user.appliance_root = home.root
    try:
        yield home, lab_users
    finally:
        stop_home(home)
