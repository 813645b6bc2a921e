"""The real StudioML client (`studioml` 0.0.49 from PyPI) pointed at a running appliance:
`studio run --queue local_appliance` puts the request on the appliance's local queue, a slot
runs it, and its `output` artifact in the store holds the workload's stdout.

The client lives in its own virtualenv (it pins its own boto3, filelock, ... and drags in
Flask, grpc, google-cloud-*: ~75 packages, 360 MB, ~25 s to install from PyPI with a cold
pip cache here), built once per machine and cached under /var/cache/appliance-tests (a
temporary folder if that is not writable). Building it needs PyPI; without it the test skips
locally and fails in CI.

`studio run --queue local_appliance` returns as soon as the request is queued (it starts a
worker of its own only for a queue named exactly `local`), so the test then waits for a slot.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.appliance_fixtures import artifact_text, last_result
from tests.realparts import need, wait_for

pytestmark = pytest.mark.integration

STUDIOML = "studioml==0.0.49"
# 0.0.49 predates urllib3 2 and requests-toolbelt 1 but does not cap them: its bundled pyrebase
# imports `requests.packages.urllib3.contrib.appengine` (gone in urllib3 2) and
# `requests_toolbelt.adapters.appengine` (broken in toolbelt 1.0), so `studio run` dies on
# import with what pip picks today. These caps are what its users' environments hold.
CLIENT_REQUIREMENTS = (STUDIOML, "urllib3<2", "requests-toolbelt<1")
CACHE_ROOT = Path(os.environ.get("APPLIANCE_TEST_CACHE", "/var/cache/appliance-tests"))
INSTALL_TIMEOUT_S = 900


def _cache_root() -> Path:
    try:
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        probe = CACHE_ROOT / f".probe{os.getpid()}"
        probe.touch()
        probe.unlink()
        return CACHE_ROOT
    except OSError:
        return Path(tempfile.gettempdir()) / "appliance-tests"


@pytest.fixture(scope="session")
def studioml_client() -> Path:
    """The `bin/` folder of a virtualenv holding the real StudioML client."""
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    pins = hashlib.sha256("\n".join(CLIENT_REQUIREMENTS).encode()).hexdigest()[:8]
    venv = root / f"studioml-venv-{STUDIOML.split('==')[1]}-py{ver}-{pins}"
    done = venv / ".complete"
    with open(root / f"{venv.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test session may be building it
        if not done.exists():
            shutil.rmtree(venv, ignore_errors=True)  # a build that died half way
            problem = _build_venv_in_place(venv)
            need(problem is None, f"the StudioML client ({STUDIOML} from PyPI): {problem}")
            done.write_text(STUDIOML + "\n")
    need((venv / "bin" / "studio-run").exists(), f"{venv}/bin/studio-run")
    return venv / "bin"


def _build_venv_in_place(venv: Path) -> str | None:
    """`python -m venv` writes absolute paths into its scripts, so the venv is built where it
    stays; the `.complete` marker (written by the caller) says it is whole."""
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
              "--no-input", "-q", *CLIENT_REQUIREMENTS]]
    for argv in steps:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            shutil.rmtree(venv, ignore_errors=True)
            return f"`{' '.join(argv)}` took more than {INSTALL_TIMEOUT_S}s"
        if proc.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            return f"`{' '.join(argv)}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return None


EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "studioml" / "config.yaml"


def store_environment(appliance) -> dict:
    """HOME/secrets/s3.env (`export K=V` lines, written by `appliance up`) as a dict."""
    env = {}
    for line in (appliance.home.secrets_dir / "s3.env").read_text().splitlines():
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep:
            env[name.strip()] = value.strip().strip("'\"")
    return env


def test_the_real_studioml_client_submits_to_the_local_queue_and_a_slot_runs_it(
        studioml_client, running_appliance, tmp_path):
    """A StudioML user's steps (README): source s3.env, set STUDIOML_HOME, `studio run
    --config examples/studioml/config.yaml --queue local_appliance SCRIPT ARGS`. The runner
    then builds the experiment's environment from the client's whole `pip freeze` (less
    studioml), as it would for any user: no `runner.python` shortcut here."""
    appliance = running_appliance
    ws = tmp_path / "project"
    ws.mkdir()
    (ws / "train.py").write_text(
        "import os, sys\n"
        "import yaml  # in the client's pip freeze, so in the environment the runner built\n"
        "print('hello from the studioml client, args', sys.argv[1:], flush=True)\n"
        "print('cpus', sorted(os.sched_getaffinity(0)), flush=True)\n")
    client_home = tmp_path / "client-home"  # the client's ~: keep it off this machine's ~/.studioml
    client_home.mkdir()
    env = {"PATH": f"{studioml_client}:/usr/local/bin:/usr/bin:/bin", "HOME": str(client_home),
           "LANG": "C.UTF-8", "STUDIOML_HOME": str(appliance.home.studioml_home),
           **store_environment(appliance)}

    # --verbose info: the client logs the key it made up (and the whole request);
    # the example's resources ask for more memory than the test slots have
    result = subprocess.run(
        [str(studioml_client / "studio-run"), "--config", str(EXAMPLE_CONFIG),
         "--queue", "local_appliance", "--verbose", "info", "--ram", "256mb", "--hdd", "1gb",
         "train.py", "--lr", "0.1"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"studio run exited {result.returncode}:\n{log}"
    found = re.search(r"studio run: submitted experiment (\S+)", log)
    assert found, log
    key = found.group(1)

    done = wait_for("a slot to run the client's experiment", lambda: last_result(appliance, key),
                    timeout=600)  # builds a venv from the client's freeze first
    assert done["outcome"] == "success", (done, artifact_text(appliance, key))
    output = wait_for("the output artifact", lambda: artifact_text(appliance, key))
    assert "hello from the studioml client, args ['--lr', '0.1']" in output, output
    slot = next(s for s in appliance.status()["slots"]
                if (s["last_result"] or {}).get("experiment") == key)
    assert f"cpus {slot['cpus']}" in output, output  # it ran pinned to that slot's CPUs
    # and the appliance's own commands find it by the client's key (README)
    assert "hello from the studioml client" in appliance.cli("logs", key).stdout
