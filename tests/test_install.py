"""README's install command on this machine: ./install.sh --home DIR, again, then --uninstall."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.cgroup_fixtures import remove_cgroup_parent
from tests.realparts import need
from tests.store_fixtures import free_store_port

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = Path("/usr/local/bin/appliance")

pytestmark = pytest.mark.integration


def run(argv, env, check=True, timeout=600):
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def install_env(tmp_path):
    need(os.geteuid() == 0, "root (install.sh as root installs the launcher and starts slots)")
    saved = LAUNCHER.read_bytes() if LAUNCHER.exists() else None
    parent = f"appliance-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "APPLIANCE_CGROUP_PARENT": parent, "MC_CONFIG_DIR": str(tmp_path / "mc")}
    env.pop("APPLIANCE_HOME", None)
    home = tmp_path / "home"
    yield home, env
    if (home / "venv" / "bin" / "appliance").exists():
        run([str(home / "venv" / "bin" / "appliance"), "--home", str(home), "down"], env, check=False)
    remove_cgroup_parent(parent)
    if saved is not None:
        LAUNCHER.write_bytes(saved)
        LAUNCHER.chmod(0o755)


def checkout_copy(dest: Path) -> Path:
    """The repository's tracked files, as a fresh clone has them."""
    dest.mkdir()
    repo, out = shlex.quote(str(REPO)), shlex.quote(str(dest))
    subprocess.run(f"git -C {repo} ls-files -z | tar -C {repo} --null -T - -cf - | tar -C {out} -xf -",
                   shell=True, check=True)
    return dest


def tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_install_runs_the_appliance_and_uninstall_keeps_the_data(install_env, tmp_path):
    home, env = install_env
    home.mkdir()
    checkout = checkout_copy(tmp_path / "checkout")
    files = tree(checkout)
    config = home / "appliance.toml"
    config.write_text("# my own note, kept\n[host]\nreserved_cpus = 0\n"
                      f"[object_store]\nport = {free_store_port()}\n[runner]\ndrain_timeout = \"10s\"\n")
    before = config.read_text()

    out = run([str(checkout / "install.sh"), "--home", str(home)], env)
    assert "done" in out.stdout
    assert tree(checkout) == files  # nothing built in the checkout (a root-owned egg-info would
    #                                 stop a later ./install.sh by the checkout's owner)
    assert config.read_text() == before  # the user's config is never overwritten
    status = json.loads(run(["appliance", "status", "--json"], env).stdout)  # the launcher knows the home
    assert status["home"] == str(home)
    assert status["slots"] and all(s["state"] == "RUNNING" for s in status["slots"])
    assert status["store"]["healthy"]
    assert (home / "secrets" / "store.json").stat().st_mode & 0o777 == 0o600
    pids = [s["pid"] for s in status["slots"]]

    run([str(checkout / "install.sh"), "--home", str(home)], env)  # again: safe, nothing restarts
    status = json.loads(run(["appliance", "status", "--json"], env).stdout)
    assert [s["pid"] for s in status["slots"]] == pids

    run([str(checkout / "install.sh"), "--uninstall", "--home", str(home)], env)
    assert not (home / "venv").exists() and not LAUNCHER.exists()
    assert config.read_text() == before and (home / "store").is_dir() and (home / "secrets" / "store.json").exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]

    run([str(checkout / "install.sh"), "--uninstall", "--purge", "--home", str(home)], env)
    assert not home.exists()


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--purge"], "--purge goes with --uninstall"),
    (["--home"], "--home needs a directory"),
])
def test_install_refuses_bad_options(args, message):
    if not shutil.which("bash"):
        pytest.skip("no bash")
    result = run([str(REPO / "install.sh"), *args], dict(os.environ), check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_install_refuses_an_interpreter_other_users_cannot_run(tmp_path):
    """A pyenv or conda python under /root would leave a launcher that fails for every member."""
    need(os.geteuid() == 0 and shutil.which("runuser") is not None, "root and runuser (to try it as nobody)")
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    (private / "python3").symlink_to(shutil.which("python3"))
    env = {**os.environ, "PYTHON": str(private / "python3")}
    result = run([str(REPO / "install.sh"), "--home", str(tmp_path / "home"), "--no-start"], env, check=False)
    assert result.returncode != 0
    assert f"PYTHON={private / 'python3'} cannot be run by other users" in result.stderr
    assert not (tmp_path / "home" / "venv").exists()


def test_the_launcher_runs_for_every_user_and_a_rerun_repairs_a_broken_venv(install_env, tmp_path):
    need(shutil.which("runuser") is not None, "runuser (to run the launcher as nobody)")
    home, env = install_env
    home.mkdir()
    os.chmod(tmp_path, 0o755)  # the home must be reachable by other users, as /var/lib/appliance is
    checkout = checkout_copy(tmp_path / "checkout")
    run([str(checkout / "install.sh"), "--home", str(home), "--no-start"], env)
    # no runner has started yet: the runners' -OO bytecode is the install's (a runner started where
    # .pyc files are not written would otherwise compile the package at every start)
    assert list((home / "venv").rglob("appliance/runner/__pycache__/runner.*.opt-2.pyc"))
    as_nobody = ["runuser", "-u", "nobody", "--", str(LAUNCHER), "--version"]
    assert subprocess.run(as_nobody, capture_output=True, text=True, cwd="/").returncode == 0
    assert os.path.realpath(home / "venv" / "bin" / "python").startswith("/usr/")  # not an interpreter under /root

    python = home / "venv" / "bin" / "python"
    python.unlink()
    python.symlink_to("/nonexistent/python3")  # its interpreter is gone, as after removing a pyenv
    out = run([str(checkout / "install.sh"), "--home", str(home), "--no-start"], env)
    assert "is broken or not usable by other users: making it again" in out.stdout
    done = subprocess.run(as_nobody, capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
