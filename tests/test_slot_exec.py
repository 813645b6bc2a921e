"""The exec wrapper: argument checks, then real runs in real cgroups with a private /dev/shm."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from appliance.slot import cgroup
from appliance.slot.exec import Request, StepFailed, parse_args, slot_environment
from tests.realparts import need
from tests.test_slot_cgroup import REPO

MiB = 1024 * 1024
SLOT = "s0"


# --------------------------------------------------------------------------- arguments


def _args(*extra: str, cmd=("true",)) -> list[str]:
    base = ["--slot", SLOT, "--cpus", "0-1,3", "--mems", "0", "--memory-bytes", "1048576", "--shm-bytes", "65536"]
    return base + list(extra) + ["--"] + list(cmd)


def test_parse_args_reads_everything():
    req = parse_args(_args("--gpus", "GPU-a,GPU-b", "--user=nobody", cmd=("python", "-m", "x", "--", "y")))
    assert (req.slot, req.cpus, req.mems) == (SLOT, [0, 1, 3], [0])
    assert (req.memory_bytes, req.shm_bytes) == (1048576, 65536)
    assert req.gpus == ["GPU-a", "GPU-b"]
    assert req.user == "nobody"
    assert req.command == ["python", "-m", "x", "--", "y"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--slot", SLOT, "--", "true"], "missing --cpus, --mems, --memory-bytes, --shm-bytes"),
        (_args(cmd=()), "no command after '--'"),
        (_args("--bogus", "1"), "unknown argument '--bogus'"),
        (_args("--cpus", "one"), "--cpus: bad CPU list 'one'"),
        (_args("--cpus", ""), "--cpus is empty"),
        (_args("--mems", "0-"), "--mems: bad CPU list"),
        (_args("--memory-bytes", "0"), "--memory-bytes must be a positive whole number"),
        (_args("--memory-bytes", "1G"), "--memory-bytes must be a positive whole number of bytes, not '1G'"),
        (_args("--shm-bytes", "-5"), "--shm-bytes must be a positive"),
        (["--slot"], "--slot needs a value"),
    ],
)
def test_parse_args_errors_name_the_problem(argv, message):
    with pytest.raises(StepFailed, match=None) as info:
        parse_args(argv)
    assert info.value.step == "arguments"
    assert message in str(info.value)


def test_environment_hides_gpus_on_cpu_slots():
    req = Request(SLOT, [0, 1, 2], [0], 1 << 30, 1 << 26, [], None, ["true"])
    env = slot_environment(req, {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["APPLIANCE_SLOT"] == SLOT
    assert env["APPLIANCE_SLOT_CPUS"] == "0-2"
    assert env["APPLIANCE_SLOT_MEMORY_BYTES"] == str(1 << 30)
    assert env["APPLIANCE_SLOT_SHM_BYTES"] == str(1 << 26)
    assert env["PATH"] == "/bin"
    assert env["APPLIANCE_GPU_MEMORY_BYTES"] == "0"
    req.gpus = ["GPU-1111", "GPU-2222"]
    assert slot_environment(req, {})["CUDA_VISIBLE_DEVICES"] == "GPU-1111,GPU-2222"


def test_a_mig_slot_sees_its_mig_device_and_how_much_gpu_memory_it_may_use():
    req = parse_args(_args("--gpus", "MIG-4f1b", "--gpu-memory-bytes", str(10 << 30)))
    env = slot_environment(req, {})
    assert (env["CUDA_VISIBLE_DEVICES"], env["APPLIANCE_GPU_MEMORY_BYTES"]) == ("MIG-4f1b", str(10 << 30))
    with pytest.raises(StepFailed, match="--gpu-memory-bytes must be a positive whole number"):
        parse_args(_args("--gpus", "GPU-1", "--gpu-memory-bytes", "lots"))


# --------------------------------------------------------------------------- running the wrapper


def _wrapper_argv(cpus="0", memory=256 * MiB, shm=64 * MiB, extra=(), cmd=("true",)) -> list[str]:
    return [
        sys.executable, "-m", "appliance.slot.exec",
        "--slot", SLOT, "--cpus", cpus, "--mems", "0",
        "--memory-bytes", str(memory), "--shm-bytes", str(shm),
        *extra, "--", *cmd,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=REPO)


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=120, **kw)


def _assert_one_line_failure(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("appliance.slot.exec: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    "change, needles",
    [
        (["--cpus", "zero"], ["arguments failed", "--cpus", "'zero'"]),
        (["--memory-bytes", "0"], ["arguments failed", "--memory-bytes"]),
    ],
)
def test_wrapper_bad_arguments_exit_2(change, needles):
    argv = _wrapper_argv()
    at = argv.index(change[0])
    argv[at : at + 2] = change
    _assert_one_line_failure(_run(argv), *needles)


def test_wrapper_unknown_cpu_exit_2(cgroup_parent):
    done = _run(_wrapper_argv(cpus="0,4095"))
    _assert_one_line_failure(done, "cgroup failed", "CPU 4095 is not available", "fix:")


def test_wrapper_unknown_user_exit_2(cgroup_parent):
    done = _run(_wrapper_argv(extra=("--user", "no-such-user-here")))
    _assert_one_line_failure(done, "user failed", "no such user 'no-such-user-here'")


def test_wrapper_missing_command_exit_2(cgroup_parent):
    done = _run(_wrapper_argv(cmd=("/no/such/program",)))
    _assert_one_line_failure(done, "exec failed", "/no/such/program")


def _wait_for(check, what: str, tries: int = 1000):
    """Poll until check() is truthy (bounded; never asserts on elapsed time)."""
    for _ in range(tries):
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


def _comm(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except FileNotFoundError:
        return ""


def _status_field(pid: int, field: str) -> str:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _shm_mounts(pid: str | int) -> list[str]:
    return [line for line in open(f"/proc/{pid}/mountinfo") if line.split()[4] == "/dev/shm"]


def _fs_size(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def test_wrapper_isolates_and_execs(cgroup_parent):
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1]
    host_shm_size, host_shm_mounts = _fs_size("/dev/shm"), _shm_mounts("self")
    proc = subprocess.Popen(_wrapper_argv(cpus=str(cpu), cmd=("sleep", "30")), env=_env())
    try:
        _wait_for(lambda: _comm(proc.pid) == "sleep", "the wrapper to exec sleep")
        # Same pid: the wrapper exec'd, so supervisord's signals reach the real process.
        assert _status_field(proc.pid, "Cpus_allowed_list") == str(cpu)
        assert f"/{cgroup_parent}/{SLOT}/runner\n" in open(f"/proc/{proc.pid}/cgroup").read()
        assert cgroup.slot_pids(SLOT) == [proc.pid]

        cg = cgroup.SlotCgroup(SLOT)
        if cg.hierarchy.version == "v1":
            assert _read(cg.memory_dir, "memory.limit_in_bytes") == str(256 * MiB)
            assert _read(cg.cpuset_dir, "cpuset.cpus") == str(cpu)
        else:
            assert _read(cg.memory_dir, "memory.max") == str(256 * MiB)
            assert _read(cg.cpuset_dir, "cpuset.cpus") == str(cpu)

        # Its /dev/shm is a private 64 MiB tmpfs, seen through its own mount namespace...
        assert _fs_size(f"/proc/{proc.pid}/root/dev/shm") == 64 * MiB
        (inner,) = [m for m in _shm_mounts(proc.pid) if "size=65536k" in m]
        assert " - tmpfs " in inner
        # ...and the host's is untouched.
        assert _fs_size("/dev/shm") == host_shm_size
        assert _shm_mounts("self") == host_shm_mounts

        env = dict(
            item.split("=", 1) for item in open(f"/proc/{proc.pid}/environ").read().split("\0") if "=" in item
        )
        assert env["CUDA_VISIBLE_DEVICES"] == ""
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["APPLIANCE_SLOT"] == SLOT
        assert env["APPLIANCE_SLOT_CPUS"] == str(cpu)
        assert env["APPLIANCE_SLOT_MEMORY_BYTES"] == str(256 * MiB)
        assert env["APPLIANCE_SLOT_SHM_BYTES"] == str(64 * MiB)

        proc.terminate()
        assert proc.wait(timeout=30) == -15
    finally:
        proc.kill()
        proc.wait()
    _wait_for(lambda: not cgroup.slot_pids(SLOT), "the slot to empty")
    cgroup.remove_slot(SLOT)
    for root in cg.hierarchy.roots():
        assert not os.path.exists(cg.path(root))


def test_shm_is_bounded_and_charged_to_the_slot(cgroup_parent):
    script = (
        "head -c 16777216 /dev/zero > /dev/shm/fill && "
        "if head -c 16777216 /dev/zero > /dev/shm/more 2>/dev/null; then echo overflowed; else echo full; fi; "
        "exec sleep 30"
    )
    proc = subprocess.Popen(
        _wrapper_argv(shm=24 * MiB, cmd=("sh", "-c", script)), env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "full"  # the tmpfs stops at its 24 MiB size
        _wait_for(lambda: _comm(proc.pid) == "sleep", "sleep")
        assert cgroup.memory_usage(SLOT) >= 24 * MiB  # the shm pages count against the slot
        assert not os.path.exists("/dev/shm/fill")
    finally:
        proc.kill()
        proc.wait()


RUNNER_WITH_HOG = """
import os, subprocess, sys
from appliance.slot.cgroup import join_job, oom_kills
hog = "x = b'x' * (512 << 20)"
job = subprocess.run([sys.executable, "-c", hog], preexec_fn=lambda: join_job(os.environ["APPLIANCE_SLOT"]))
print(job.returncode, oom_kills(os.environ["APPLIANCE_SLOT"]), flush=True)
"""


def test_oom_kills_the_job_not_the_runner(cgroup_parent):
    done = _run(_wrapper_argv(memory=128 * MiB, cmd=(sys.executable, "-c", RUNNER_WITH_HOG)))
    assert done.returncode == 0, done.stderr  # the runner lived to report
    returncode, kills = done.stdout.split()
    assert int(returncode) == -9  # 137 from a shell
    assert int(kills) >= 1
    assert cgroup.oom_kills(SLOT) == int(kills)


RUNNER_AS_USER = """
import os, subprocess, sys
from appliance.slot.cgroup import join_job
print(os.getuid(), os.getgid(), os.environ["HOME"])
try:
    open(sys.argv[1], "w").write("1")
    print("limit-writable")
except PermissionError:
    print("limit-protected")
out = subprocess.run(["cat", "/proc/self/cgroup"], preexec_fn=lambda: join_job(os.environ["APPLIANCE_SLOT"]),
                     capture_output=True, text=True, check=True).stdout
print(out, end="")
"""


def test_user_drop_and_runner_can_still_start_jobs(cgroup_parent):
    need(os.access("/usr/bin/python3", os.X_OK), "a system python3 that user nobody can run")
    cg = cgroup.SlotCgroup(SLOT)
    limit_file = "memory.max" if cg.hierarchy.version == "v2" else "memory.limit_in_bytes"
    argv = _wrapper_argv(
        extra=("--user", "nobody"),
        cmd=("/usr/bin/python3", "-c", RUNNER_AS_USER, os.path.join(cg.memory_dir, limit_file)),
    )
    done = _run(argv)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["65534", "65534"]
    assert lines[0].split()[2] == os.path.expanduser("~nobody")
    assert lines[1] == "limit-protected"
    job_lines = [line for line in lines[2:] if line.endswith(f"/{cgroup_parent}/{SLOT}/job")]
    counting = [cg.hierarchy.cpuacct] if cg.hierarchy.cpuacct not in (None, *cg.hierarchy.roots()) else []
    assert len(job_lines) == len(cg.hierarchy.roots() + counting)  # in the job leaf of every hierarchy


def _read(*parts: str) -> str:
    with open(os.path.join(*parts)) as f:
        return f.read().strip()
