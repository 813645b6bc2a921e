"""What one job leaves to the next on the same slot (nothing), and what it is held to: a fresh
job cgroup per workload (its own peak memory, the request's `ram` as its limit), an empty
/dev/shm of the slot's full size, a bound on processes.

The runner here is a small script run by the real exec wrapper (root, in the slot's cgroup and
its own mount namespace), calling execute.run_workload as the runner does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from appliance.runner import classes
from appliance.slot import cgroup
from appliance.slot.limits import pids_limit
from tests.test_slot_cgroup import REPO

MiB = 1024 * 1024
SLOT = "s0"

# Runs the jobs given as JSON on argv[1] one after the other on this slot: [{"code", "ram"}, ...];
# prints one JSON line per job: outcome, reason, usage, output. {"build": N} first writes N MiB to a
# file from a process in the job cgroup (as an environment build does: page cache, charged there).
RUNNER = """
import json, os, subprocess, sys, tempfile
from pathlib import Path
from appliance.runner import execute
from appliance.slot.cgroup import join_job
slot = os.environ["APPLIANCE_SLOT"]
work = Path(tempfile.mkdtemp())
launcher = execute.Launcher(slot)
for n, job in enumerate(json.loads(sys.argv[1])):
    if "build" in job:
        code = f"open({str(work / 'built')!r}, 'wb').write(b'x' * ({job['build']} << 20))"
        subprocess.run([sys.executable, "-c", code], preexec_fn=lambda: join_job(slot), check=True)
        continue
    launcher.warm()
    d = work / str(n)
    (d / "ws").mkdir(parents=True)
    r = execute.run_workload([sys.executable, "-c", job["code"]], d / "ws", {"PATH": os.defpath},
                             d / "output", execute.Supervision(tick_s=0.05), slot=slot,
                             launcher=launcher, ram_bytes=job.get("ram"))
    print(json.dumps({"outcome": r.outcome, "exit_code": r.exit_code, "reason": r.reason, "usage": r.usage,
                      "output": (d / "output").read_text()}), flush=True)
launcher.close()
"""


def _run_jobs(jobs: list[dict], memory=1024 * MiB, shm=32 * MiB) -> list[dict]:
    cpu = sorted(os.sched_getaffinity(0))[-1]
    argv = [sys.executable, "-m", "appliance.slot.exec", "--slot", SLOT, "--cpus", str(cpu), "--mems", "0",
            "--memory-bytes", str(memory), "--shm-bytes", str(shm), "--pids-limit", "512",
            "--", sys.executable, "-c", RUNNER, json.dumps(jobs)]
    done = subprocess.run(argv, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


FILL_SHM = """
import os
with open("/dev/shm/secret", "w") as f:
    f.write("SECRET-IN-MY-PRIVATE-SHM")
os.chmod("/dev/shm/secret", 0o644)
os.makedirs("/dev/shm/dir/deeper")
try:
    with open("/dev/shm/fill", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20))
            f.flush()
except OSError:
    pass
st = os.statvfs("/dev/shm")
print("free", st.f_bavail * st.f_frsize)
"""

LOOK_AT_SHM = """
import json, os
st = os.statvfs("/dev/shm")
print(json.dumps({"files": sorted(os.listdir("/dev/shm")), "free": st.f_bavail * st.f_frsize,
                  "size": st.f_blocks * st.f_frsize}))
"""


def test_the_next_job_gets_an_empty_shm_of_the_full_size(cgroup_parent):
    a, b = _run_jobs([{"code": FILL_SHM}, {"code": LOOK_AT_SHM}], shm=32 * MiB)
    assert a["outcome"] == "success", a
    assert "free 0" in a["output"]  # job A did fill it
    seen = json.loads([line for line in b["output"].splitlines() if line.startswith("{")][0])
    assert seen == {"files": [], "free": 32 * MiB, "size": 32 * MiB}
    assert b["usage"]["peak_memory_bytes"] < 20 * MiB  # A's shm pages are not B's


HELLO = "print('hi')"

ALLOCATE = """
b = bytearray(100 << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(("VmHWM:", "RssFile:"))}
print("hwm", status["VmHWM"], "file", status["RssFile"])
"""


def test_peak_memory_is_the_workloads_own(cgroup_parent):
    hello, allocated, hello_again = _run_jobs(
        [{"build": 200}, {"code": HELLO}, {"code": ALLOCATE}, {"build": 200}, {"code": HELLO}])
    for job in (hello, allocated, hello_again):
        assert job["outcome"] == "success", job
    # neither the build's page cache nor the earlier job counts
    assert hello["usage"]["peak_memory_bytes"] < 20 * MiB, hello
    assert hello_again["usage"]["peak_memory_bytes"] < 20 * MiB, hello_again
    hwm, file = (int(allocated["output"].split(f"{name} ")[1].split()[0]) for name in ("hwm", "file"))
    # its peak, as its own VmHWM tells it; the pages of the interpreter's files it maps may be
    # charged to the cgroup that read them first (its warm interpreter's, the page cache's)
    peak = allocated["usage"]["peak_memory_bytes"]
    assert hwm - file - 5 * MiB < peak < hwm + 5 * MiB, (allocated["usage"], hwm, file)


TOUCH_600 = """
b = bytearray(600 << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
print("survived")
"""


def test_a_requests_ram_is_its_memory_limit(cgroup_parent):
    limited, unlimited = _run_jobs([{"code": TOUCH_600, "ram": 256 * MiB}, {"code": TOUCH_600}])
    assert limited["outcome"] == "out of memory", limited
    assert "ram" in limited["reason"]
    assert classes.classify(limited["outcome"], limited["exit_code"], limited["reason"]) == "oom"
    assert "survived" not in limited["output"]
    # its peak: at its limit (plus the shared libraries its VmHWM counts)
    assert 200 * MiB < limited["usage"]["peak_memory_bytes"] <= 256 * MiB + 8 * MiB
    # no `ram`: the slot's limit (1 GiB here) holds, as before
    assert unlimited["outcome"] == "success", unlimited
    assert "survived" in unlimited["output"]


# --------------------------------------------------------------------------- a fork bomb


BOMB = """
import os, sys, time
n = 0
for _ in range(2000):
    try:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
    except OSError:
        break
print(n, flush=True)
time.sleep(60)
"""

FORK_50 = """
import os, time
kids = []
for _ in range(50):
    pid = os.fork()
    if pid == 0:
        time.sleep(0.5)
        os._exit(0)
    kids.append(pid)
print(sum(os.waitpid(p, 0)[1] == 0 for p in kids))
"""


def test_a_fork_bomb_stays_in_its_slot(cgroup_parent):
    cpus = sorted(os.sched_getaffinity(0))
    bombed = cgroup.setup_slot("bombed", cpus[:1], [0], 512 * MiB, pids_max=64)
    other = cgroup.setup_slot("other", cpus[-1:], [0], 512 * MiB, pids_max=64)
    bomb = subprocess.Popen([sys.executable, "-c", BOMB], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: cgroup.join_job("bombed"))
    try:
        forked = int(bomb.stdout.readline())
        assert forked < 64  # the bound held: the bomb's processes stop at the slot's pids bound
        assert len(bombed.pids()) <= 64
        # while they live, the other slot still starts processes
        done = subprocess.run([sys.executable, "-c", FORK_50], capture_output=True, text=True, timeout=60,
                              preexec_fn=lambda: cgroup.join_job("other"))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "50"
    finally:
        bombed.kill_leaf("job")
        bomb.wait()
        for _ in range(200):
            if not bombed.pids():
                break
            time.sleep(0.01)
    assert other.pids() == []


@pytest.mark.parametrize("configured, pid_max, expected", [
    ("auto", 4194304, 4096),  # a usual 64-bit host
    ("auto", 32768, 4096),  # an eighth of the smallest usual pid_max
    ("auto", 16384, 2048),
    ("auto", 100, 64),  # never below 64
    (500, 4194304, 500),  # what the config says
])
def test_pids_limit(configured, pid_max, expected):
    assert pids_limit(configured, pid_max) == expected


def test_in_a_docker_slot_shm_is_emptied_without_following_links(tmp_path):
    from appliance.slot.shm import fresh_shm

    shm, outside = tmp_path / "shm", tmp_path / "outside"
    (shm / "dir" / "deeper").mkdir(parents=True)
    outside.mkdir()
    (outside / "keep").write_text("not the job's")
    (shm / "secret").write_text("SECRET-IN-MY-PRIVATE-SHM")
    (shm / "dir" / "deeper" / "more").write_text("x")
    (shm / "link").symlink_to(outside)
    (shm / "dir" / "link").symlink_to(outside / "keep")
    os.mkfifo(shm / "fifo")
    deep = os.open(shm, os.O_RDONLY)
    for _ in range(3000):  # deeper than any recursion or path length allows
        os.mkdir("d", dir_fd=deep)
        inner = os.open("d", os.O_RDONLY, dir_fd=deep)
        os.close(deep)
        deep = inner
    os.close(os.open("SECRET", os.O_CREAT | os.O_WRONLY, dir_fd=deep))
    os.close(deep)
    docker = {"APPLIANCE_SLOT_SHM_BYTES": str(64 * MiB), "APPLIANCE_ISOLATION": "docker"}
    assert fresh_shm(docker, path=str(shm)) == "emptied"
    assert list(shm.iterdir()) == []
    assert (outside / "keep").read_text() == "not the job's"
    # a runner that is no slot's (no size said, or a host that only looks like a container)
    # never touches the /dev/shm it sees
    (shm / "other").write_text("the host's")
    assert fresh_shm({}, path=str(shm)) == ""
    assert fresh_shm({"APPLIANCE_SLOT_SHM_BYTES": str(64 * MiB)}, path=str(shm)) == ""
    not_ours = {"APPLIANCE_SLOT_SHM_BYTES": str(64 * MiB), "APPLIANCE_SLOT_SHM_NS": "mnt:[1]"}
    assert fresh_shm(not_ours, path=str(shm)) == ""  # the wrapper's namespace, not this one
    assert (shm / "other").exists()
