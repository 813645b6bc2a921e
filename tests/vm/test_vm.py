"""The install path on a real systemd + cgroup v2 machine: a Debian 12 guest under qemu.

Skipped unless APPLIANCE_VM_TEST=1 (it takes ~15 minutes under software emulation); run it with
`tests/vm/run.sh`, which prints the transcript. The tests run in file order on one guest: the
README's install (`sudo ./install.sh` by a user with sudo), then each promise of the systemd path.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.vm.guest import REPO, Guest, build_wheelhouse, image_dir, log, source_files

pytestmark = pytest.mark.skipif(os.environ.get("APPLIANCE_VM_TEST") != "1",
                                reason="the VM test runs only with APPLIANCE_VM_TEST=1 (tests/vm/run.sh)")

ROOT_HOME = "/var/lib/appliance"
SLEEP_JOB = """import sys, time
print("start", sys.argv[2], flush=True)
time.sleep(float(sys.argv[1]))
print("finished", sys.argv[2], flush=True)
"""
HOG_JOB = """chunks = []
while True:
    chunks.append(bytearray(16 * 1024 * 1024))  # touched pages: really charged to the job's cgroup
"""


@pytest.fixture(scope="module")
def guest():
    for tool in ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "ssh"):
        if not shutil.which(tool):
            pytest.fail(f"no {tool}: apt-get install qemu-system-x86 qemu-utils debootstrap e2fsprogs openssh-client")
    image = image_dir()
    with tempfile.TemporaryDirectory(prefix="appliance-vm-") as tmp:
        work = Path(tmp)
        with Guest(image, work) as g:
            start = time.monotonic()
            wheels = work / "wheelhouse"
            files = build_wheelhouse(wheels)
            g.copy_in(files, wheels, "/opt/wheelhouse")
            g.copy_in(source_files(), REPO, "/home/alice/appliance", user="alice")
            # a second checkout for the install without root: the root install leaves a root-owned
            # appliance.egg-info in its checkout, where alice's own pip then cannot build
            g.copy_in(source_files(), REPO, "/home/alice/appliance-user", user="alice")
            g.run("mkdir -p ~/job && cat > ~/job/sleep.py && chmod -R a+rX ~/job", user="alice",
                  input=SLEEP_JOB.encode())
            g.run("mkdir -p ~/hog && cat > ~/hog/hog.py", user="alice", input=HOG_JOB.encode())
            log(f"copy: the source and {len(files)} wheels into the guest in {time.monotonic() - start:.0f}s")
            yield g


# ------------------------------------------------------------------------------------------ helpers

def status(g: Guest, launcher: str = "appliance") -> dict:
    return json.loads(g.run(f"sudo {launcher} status --json", user="alice").stdout)


def unit_cgroup(g: Guest) -> str:
    return g.run("systemctl show -P ControlGroup appliance").stdout.strip()


def cgroup_of(g: Guest, pid: int) -> str:
    lines = g.run(f"cat /proc/{pid}/cgroup").stdout.splitlines()
    return next(line[3:] for line in lines if line.startswith("0::"))


def read(g: Guest, path: str) -> str:
    return g.run(f"cat {shlex.quote(path)}").stdout.strip()


def cpu_set(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def check_slots_match_plan(g: Guest, launcher: str = "appliance") -> dict:
    """Every slot's cgroup and /dev/shm hold what the plan says; returns the status."""
    st = status(g, launcher)
    plan = json.loads(read(g, f"{st['home']}/run/plan.json"))
    assert [s["name"] for s in st["slots"]] == [s["name"] for s in plan["slots"]]
    unit = unit_cgroup(g)
    for slot, planned in zip(st["slots"], plan["slots"]):
        assert slot["state"] == "RUNNING", slot
        runner = cgroup_of(g, slot["pid"])
        slot_dir = "/sys/fs/cgroup" + runner.rsplit("/", 1)[0]
        assert runner.endswith(f"/{slot['name']}/runner"), runner
        assert runner.startswith(unit + "/"), f"{slot['name']}'s runner is in {runner}, outside the unit {unit}"
        effective = read(g, f"{slot_dir}/cpuset.cpus.effective")
        memory_max = read(g, f"{slot_dir}/memory.max")
        shm = int(g.run(f"nsenter -t {slot['pid']} -m df -B1 --output=size /dev/shm").stdout.split()[-1])
        log(f"  {slot['name']}: {runner}: cpuset.cpus.effective={effective} (plan {planned['cpus']}), "
            f"memory.max={memory_max} (plan {planned['memory_bytes']}), /dev/shm={shm} (plan {planned['shm_bytes']})")
        assert cpu_set(effective) == set(planned["cpus"])
        assert int(memory_max) == planned["memory_bytes"]
        assert shm == -(-planned["shm_bytes"] // 4096) * 4096  # tmpfs rounds up to whole pages
    return st


def submit(g: Guest, seconds: float, tag: str) -> str:
    out = g.run(f"cd ~/job && sudo appliance submit --no-freeze --ram 100mb sleep.py {seconds} {tag}",
                user="alice").stdout
    return out.split()[0]


def queue_rows(g: Guest) -> list[dict]:
    return json.loads(g.run("sudo appliance queue ls --json", user="alice").stdout)


def dead_letters(g: Guest) -> int:
    return sum(row["dead"] or 0 for row in queue_rows(g))


def wait_finished(g: Guest, keys: dict[str, str], dead_before: int = 0, timeout: float = 900) -> None:
    """Wait until every experiment printed its last line and the queue is empty, no new dead letter."""
    deadline = time.monotonic() + timeout
    left = dict(keys)
    while left and time.monotonic() < deadline:
        for key, tag in list(left.items()):
            if f"finished {tag}" in g.run(f"sudo appliance logs {key}", user="alice", check=False).stdout:
                del left[key]
        time.sleep(5)
    queues = g.run("sudo appliance queue ls", user="alice").stdout
    assert not left, f"experiments lost or stuck: {left}; queue: {queues}"
    queues = g.run("sudo appliance queue ls", user="alice").stdout
    log("  queue: " + " | ".join(queues.splitlines()[1:]))
    for row in queue_rows(g):
        assert (row["waiting"], row["running"]) == (0, 0), queues
    assert dead_letters(g) == dead_before, queues


def wait_active(g: Guest, not_pid: int | None = None, timeout: float = 300) -> int:
    """Wait until the unit is active with a supervisord that answers; returns its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if g.run("systemctl is-active appliance", check=False).stdout.strip() == "active":
            r = g.run("sudo appliance status --json", user="alice", check=False)
            if r.returncode == 0:
                st = json.loads(r.stdout)
                if st["running"] and st["supervisord_pid"] != not_pid and \
                        all(s["state"] == "RUNNING" for s in st["slots"]):
                    return st["supervisord_pid"]
        time.sleep(3)
    raise AssertionError("appliance.service did not come back: " +
                         g.run("systemctl status appliance --no-pager; journalctl -u appliance -n 30 --no-pager",
                               check=False).stdout)


# ------------------------------------------------------------------------------------------ checks

def test_install_as_the_readme_says(guest):
    start = time.monotonic()
    out = guest.run("cd ~/appliance && sudo ./install.sh", user="alice", timeout=1200)
    log(f"install: `sudo ./install.sh` as alice took {time.monotonic() - start:.0f}s")
    for line in out.stdout.splitlines():
        log("  | " + (line.split("=")[0] + "=..." if "AWS_SECRET" in line or "AWS_ACCESS" in line else line))
    assert guest.run("systemctl is-enabled appliance").stdout.strip() == "enabled"
    assert guest.run("systemctl is-active appliance").stdout.strip() == "active"
    assert guest.run(f"test -s {ROOT_HOME}/secrets/s3.env", check=False).returncode == 0, \
        "install.sh left no secrets/s3.env (README: `sudo cat /var/lib/appliance/secrets/s3.env`)"
    assert guest.run("stat -fc %T /sys/fs/cgroup").stdout.strip() == "cgroup2fs"


def test_slots_match_the_plan_on_cgroup_v2(guest):
    check_slots_match_plan(guest)


def test_supervisord_sits_in_a_leaf_of_the_delegated_unit(guest):
    st = status(guest)
    unit = unit_cgroup(guest)
    sup = cgroup_of(guest, st["supervisord_pid"])
    log(f"  unit cgroup {unit}; supervisord in {sup}; unit's cgroup.procs "
        f"{read(guest, '/sys/fs/cgroup' + unit + '/cgroup.procs')!r}, subtree_control "
        f"{read(guest, '/sys/fs/cgroup' + unit + '/cgroup.subtree_control')!r}")
    assert sup.startswith(unit + "/"), sup
    assert read(guest, f"/sys/fs/cgroup{sup}/cgroup.subtree_control") == ""  # a leaf
    assert read(guest, f"/sys/fs/cgroup{unit}/cgroup.procs") == ""  # no internal processes
    assert {"cpuset", "memory"} <= set(read(guest, f"/sys/fs/cgroup{unit}/cgroup.subtree_control").split())
    assert guest.run("test -e /sys/fs/cgroup/appliance", check=False).returncode != 0, \
        "slot cgroups outside the unit, where systemctl stop/kill does not reach them"


def test_replan_under_systemd(guest):
    before = status(guest)
    guest.run("sudo appliance config set host.reserved_cpus 0 && sudo appliance config set slots.cpu.count 2 "
              "&& sudo appliance up", user="alice", timeout=600)
    st = check_slots_match_plan(guest)
    log(f"  re-planned: {[(s['name'], s['cpu_list'], s['memory_bytes']) for s in st['slots']]}")
    assert len(st["slots"]) == 2
    assert st["supervisord_pid"] == before["supervisord_pid"], "the re-plan restarted the whole service"
    assert guest.run("systemctl is-active appliance").stdout.strip() == "active"


def test_a_memory_hog_is_killed_and_the_other_slots_live(guest):
    before = {s["name"]: s["pid"] for s in status(guest)["slots"]}
    dead_before = dead_letters(guest)
    sleeper = submit(guest, 40, "beside-the-hog")
    hog = guest.run("cd ~/hog && sudo appliance submit --no-freeze --ram 100mb hog.py", user="alice").stdout.split()[0]
    deadline = time.monotonic() + 600
    dead = ""
    while time.monotonic() < deadline and hog not in dead:
        time.sleep(5)
        dead = guest.run("sudo appliance queue dead", user="alice").stdout
    log("  queue dead: " + " | ".join(dead.splitlines()))
    assert hog in dead and "out of memory" in dead
    wait_finished(guest, {sleeper: "beside-the-hog"}, dead_before + 1)
    after = {s["name"]: s["pid"] for s in status(guest)["slots"]}
    assert after == before, "a runner died with the hog"


def test_systemctl_kill_brings_it_back_with_the_queue(guest):
    old = status(guest)["supervisord_pid"]
    dead_before = dead_letters(guest)
    keys = {submit(guest, 30, f"kill-{i}"): f"kill-{i}" for i in range(3)}
    time.sleep(10)
    guest.run("systemctl kill -s KILL appliance")
    log("  systemctl kill -s KILL appliance")
    new = wait_active(guest, not_pid=old)
    restarts = guest.run("systemctl show -P NRestarts appliance").stdout.strip()
    log(f"  back: supervisord {old} -> {new}, NRestarts={restarts}")
    wait_finished(guest, keys, dead_before)


def test_a_reboot_brings_it_back_with_the_queue(guest):
    dead_before = dead_letters(guest)
    keys = {submit(guest, 30, f"reboot-{i}"): f"reboot-{i}" for i in range(3)}
    time.sleep(10)
    guest.reboot()
    wait_active(guest)
    check_slots_match_plan(guest)
    wait_finished(guest, keys, dead_before)


def test_uninstall_leaves_nothing_running(guest):
    guest.run("cd ~/appliance && sudo ./install.sh --uninstall", user="alice", timeout=600)
    assert_nothing_running(guest)


def test_non_root_install_and_uninstall(guest):
    start = time.monotonic()
    out = guest.run("cd ~/appliance-user && ./install.sh", user="alice", timeout=1200)
    log(f"install: `./install.sh` as alice (sudo inside) took {time.monotonic() - start:.0f}s")
    for line in out.stdout.splitlines()[-6:]:
        log("  | " + line)
    assert guest.run("systemctl is-active appliance").stdout.strip() == "active"
    launcher = "/home/alice/.local/bin/appliance"
    st = check_slots_match_plan(guest, launcher)
    assert st["home"] == "/home/alice/.local/share/appliance"
    guest.run("cd ~/appliance-user && ./install.sh --uninstall", user="alice", timeout=600)
    assert_nothing_running(guest)


def assert_nothing_running(g: Guest) -> None:
    left = g.run("systemctl is-active appliance; ps -eo pid=,args= | "
                 "grep -E '[s]upervisord|[w]eed mini|[a]ppliance[.](slot|store|controller)|bin/[a]ppliance' || true; "
                 "ls /etc/systemd/system/appliance.service /sys/fs/cgroup/appliance "
                 "/sys/fs/cgroup/system.slice/appliance.service 2>/dev/null || true", check=False).stdout
    log("  after uninstall: " + " | ".join(left.splitlines()))
    assert left.split() == ["inactive"], left
