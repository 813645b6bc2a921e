"""A full disk under the bundled store: status says so, the store writes again by itself once
space returns, and a restart of its program leaves no store process behind.

The home is a small tmpfs, filled to its last byte as an operator's disk would be."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from appliance import supervisor
from appliance.store.client import s3_client
from appliance.store.credentials import load_credentials
from tests.appliance_fixtures import make_home, stop_home
from tests.realparts import need

SIZE = "300m"


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    need(os.geteuid() == 0, "root (mounts a tmpfs home)")
    base = tmp_path_factory.mktemp("fulldisk")
    (base / "home").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(base / "home")], check=True)
    appliance = make_home(base)
    try:
        appliance.cli("up", "--timeout", "90")
        yield appliance
    finally:
        stop_home(appliance)
        subprocess.run(["umount", "-l", str(base / "home")], check=False)


def quick_client(appliance):
    """A client that gives up in seconds: a store that hangs must fail the test, not stall it."""
    creds = load_credentials(appliance.home)
    port = re.search(r"port = (\d+)", appliance.home.config_file.read_text()).group(1)
    return s3_client(f"http://127.0.0.1:{port}", creds.access_key, creds.secret_key, connect_timeout=3,
                     read_timeout=10, attempts=1)


def fill(appliance):
    """Fill the home's filesystem to 0 bytes free, then make the store try to write into it."""
    path = appliance.root / "fill"
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M"], capture_output=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        while True:  # the last partial megabyte too
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    assert os.statvfs(appliance.root).f_bavail == 0
    client = quick_client(appliance)
    for i in range(40):
        try:
            client.put_object(Bucket="appliance", Key=f"full/{i}", Body=os.urandom(20000))
        except Exception:  # noqa: BLE001 - what a runner's upload meets on a full disk
            break
    else:
        raise AssertionError("the store took every write on a full disk: the test did not fill it")
    return path


def put_works(appliance) -> bool:
    try:
        quick_client(appliance).put_object(Bucket="appliance", Key=f"after/{uuid.uuid4()}", Body=b"x" * 1000)
        return True
    except Exception:  # noqa: BLE001 - still failing
        return False


def wait_until(what, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(1)
    return False


def metrics_text(appliance) -> str:
    listen = re.search(r'listen = "([^"]+)"', appliance.home.config_file.read_text()).group(1)
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as r:
        return r.read().decode()


def weeds(appliance) -> list[tuple[int, int]]:
    """(pid, parent pid) of every `weed` serving this home's store."""
    mark = f"-dir={appliance.home.store_data}".encode()
    found = []
    for entry in os.listdir("/proc"):
        try:
            argv = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        if argv and argv[0].endswith(b"weed") and mark in argv:
            found.append((int(entry), int(stat.rsplit(")", 1)[1].split()[1])))
    return found


def test_a_full_disk_is_reported_and_the_store_writes_again_once_space_returns(small_disk):
    appliance = small_disk
    assert appliance.status()["store"]["healthy"]
    path = fill(appliance)
    try:
        store = appliance.status()["store"]
        assert not store["healthy"] and store["problem"].startswith("store cannot write: disk full"), store
        doctor = appliance.cli("doctor", check=False)
        assert "store cannot write: disk full" in doctor.stdout + doctor.stderr
        assert wait_until(lambda: 'appliance_store_problem{problem="store cannot write: disk full'
                          in metrics_text(appliance), 40), metrics_text(appliance)
        assert "appliance_store_up 0.0" in metrics_text(appliance)
    finally:
        path.unlink()
    # no down/up, no restart by hand: the store writes again by itself (its filer stayed broken before)
    assert wait_until(lambda: put_works(appliance), 60), \
        (appliance.home.logs_dir / "store.log").read_text()[-3000:]
    assert wait_until(lambda: appliance.status()["store"]["healthy"], 30), appliance.status()["store"]


def test_restarting_the_store_program_leaves_no_store_behind(small_disk):
    """`supervisorctl restart store` after the disk was full: a store hanging in its shutdown is
    killed, not orphaned holding the store's lock (the new one crash-looped on it, exit 75)."""
    appliance = small_disk
    fill(appliance).unlink()
    result = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c",
                             str(appliance.home.supervisord_conf), "restart", "store"],
                            capture_output=True, text=True, timeout=120)
    assert "started" in result.stdout, result.stdout + result.stderr
    assert wait_until(lambda: put_works(appliance), 60), \
        (appliance.home.logs_dir / "store.log").read_text()[-3000:]
    program = supervisor.processes(appliance.home)["store"]
    assert program.state == "RUNNING"
    running = weeds(appliance)
    assert [parent for _, parent in running] == [program.pid], (running, program)
    time.sleep(5)
    again = supervisor.processes(appliance.home)["store"]
    assert (again.state, again.pid) == ("RUNNING", program.pid), again
    assert "exit status 75" not in (appliance.home.logs_dir / "supervisord.log").read_text()
    assert json.loads(appliance.cli("status", "--json").stdout)["store"]["healthy"]


@pytest.mark.parametrize("hurt,free_mib,since_start,probe", [
    (False, 500, 600, False),  # never full: no write is spent on a resting store
    (True, 0, 600, False),  # still full: a write cannot work yet
    (True, 8, 600, False),  # barely any room
    (True, 16, 600, True),  # room again: prove a write
    (True, 500, 5, False),  # just (re)started: give it time
])
def test_when_the_watchdog_proves_a_write(hurt, free_mib, since_start, probe):
    from appliance.store.watchdog import should_probe

    assert should_probe(hurt, free_mib * 1024 * 1024, since_start) is probe
