"""The slot exec wrapper: isolate this process, then exec the runner in its place.

    python -m appliance.slot.exec --slot NAME --cpus 0-1,3 --mems 0 --memory-bytes N
        --shm-bytes N [--pids-limit N] [--gpus UUID,UUID [--gpu-memory-bytes N]] [--user USER]
        [--lock PATH [--lock-wait S]]
        -- CMD [ARGS...]

Steps, in this order: the slot's lock (one runner per slot: a runner that a dead supervisord
left behind is waited for, up to --lock-wait seconds; see appliance/singleton.py), cgroup
(create/update the slot with its memory limit and pids bound, join its runner leaf), CPU
affinity, private /dev/shm (needs root, so before dropping it), environment, user, exec.
Because it exec()s, supervisord's signals reach the real runner, and the runner holds the lock.
Any failure prints one line naming the step and the fix, and exits 2 (EXIT_BUSY, 75, when the
lock stayed taken).

Started once per slot start, so imports stay light: no argparse, ctypes only inside shm.
"""

from __future__ import annotations

import os
import sys

from appliance import singleton
from appliance.slot.cgroup import CgroupError, SlotCgroup
from appliance.slot.limits import format_cpu_list, parse_cpu_list
from appliance.slot.shm import NS_ENV, ShmError, mount_namespace, private_shm

USAGE = (
    "usage: python -m appliance.slot.exec --slot NAME --cpus LIST --mems LIST "
    "--memory-bytes N --shm-bytes N [--pids-limit N] [--gpus UUID,UUID [--gpu-memory-bytes N]] [--user USER] "
    "[--lock PATH [--lock-wait S]] "
    "-- CMD [ARGS...]"
)
OPTIONS = ("--slot", "--cpus", "--mems", "--memory-bytes", "--shm-bytes", "--pids-limit", "--gpus",
           "--gpu-memory-bytes", "--user", "--lock", "--lock-wait")
REQUIRED = ("--slot", "--cpus", "--mems", "--memory-bytes", "--shm-bytes")


class StepFailed(Exception):
    """One step of the wrapper failed: `step` names it, the message says why and what to do."""

    def __init__(self, step: str, message: str):
        super().__init__(message)
        self.step = step


class Request:
    """The parsed command line."""

    def __init__(self, slot, cpus, mems, memory_bytes, shm_bytes, gpus, user, command, lock=None,
                 lock_wait=singleton.DEFAULT_WAIT_S, gpu_memory_bytes=0, pids_limit=None):
        self.slot: str = slot
        self.cpus: list[int] = cpus
        self.mems: list[int] = mems
        self.memory_bytes: int = memory_bytes
        self.shm_bytes: int = shm_bytes
        self.pids_limit: int | None = pids_limit  # processes and threads a job may have (None: no bound)
        self.gpus: list[str] = gpus
        self.gpu_memory_bytes: int = gpu_memory_bytes  # what the slot may use on each GPU (0: no GPU)
        self.user: str | None = user
        self.command: list[str] = command
        self.lock: str | None = lock
        self.lock_wait: float = lock_wait


def parse_args(argv: list[str]) -> Request:
    """Parse the command line; StepFailed("arguments", ...) on anything wrong."""
    values: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name not in OPTIONS:
            raise StepFailed("arguments", f"unknown argument {arg!r}; {USAGE}")
        if not eq:
            if i + 1 >= len(argv):
                raise StepFailed("arguments", f"{name} needs a value; {USAGE}")
            i += 1
            value = argv[i]
        values[name] = value
        i += 1
    command = argv[i + 1 :]
    if not command:
        raise StepFailed("arguments", f"no command after '--'; {USAGE}")
    missing = [name for name in REQUIRED if name not in values]
    if missing:
        raise StepFailed("arguments", f"missing {', '.join(missing)}; {USAGE}")

    cpus = _cpu_list(values["--cpus"], "--cpus")
    mems = _cpu_list(values["--mems"], "--mems")
    gpus = [g.strip() for g in values.get("--gpus", "").split(",") if g.strip()]
    return Request(
        slot=values["--slot"],
        cpus=cpus,
        mems=mems,
        memory_bytes=_positive_int(values["--memory-bytes"], "--memory-bytes"),
        shm_bytes=_positive_int(values["--shm-bytes"], "--shm-bytes"),
        gpus=gpus,
        user=values.get("--user") or None,
        command=command,
        lock=values.get("--lock") or None,
        lock_wait=_seconds(values.get("--lock-wait", str(singleton.DEFAULT_WAIT_S)), "--lock-wait"),
        gpu_memory_bytes=_positive_int(values["--gpu-memory-bytes"], "--gpu-memory-bytes")
        if "--gpu-memory-bytes" in values else 0,
        pids_limit=_positive_int(values["--pids-limit"], "--pids-limit", "processes")
        if "--pids-limit" in values else None,
    )


def _cpu_list(text: str, option: str) -> list[int]:
    try:
        result = parse_cpu_list(text)
    except ValueError as err:
        raise StepFailed("arguments", f"{option}: {err}; write it like 0-3,8") from None
    if not result:
        raise StepFailed("arguments", f"{option} is empty; a slot needs at least one")
    return result


def _positive_int(text: str, option: str, unit: str = "bytes") -> int:
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise StepFailed("arguments", f"{option} must be a positive whole number of {unit}, not {text!r}")
    return int(text)


def _seconds(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise StepFailed("arguments", f"{option} must be a number of seconds, not {text!r}")
    return value


def slot_environment(request: Request, base: dict[str, str]) -> dict[str, str]:
    """The runner's environment: base plus the slot's variables."""
    env = dict(base)
    # Empty on a CPU-only slot: CUDA then sees no device at all instead of every device.
    env["CUDA_VISIBLE_DEVICES"] = ",".join(request.gpus)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["APPLIANCE_GPU_MEMORY_BYTES"] = str(request.gpu_memory_bytes)  # per GPU: a share or a MIG device's
    env["APPLIANCE_SLOT"] = request.slot
    env["APPLIANCE_SLOT_CPUS"] = format_cpu_list(request.cpus)
    env["APPLIANCE_SLOT_MEMORY_BYTES"] = str(request.memory_bytes)
    env["APPLIANCE_SLOT_SHM_BYTES"] = str(request.shm_bytes)
    return env


def _lookup_user(user: str):
    import pwd

    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise StepFailed("user", f"no such user {user!r}; fix: create it or pass an existing --user") from None


def _drop_to(pw, env: dict[str, str]) -> None:
    """Become pw (supplementary groups, then gid, then uid: uid last, or the rest is refused)."""
    if os.geteuid() == pw.pw_uid:
        pass
    elif os.geteuid() != 0:
        raise StepFailed("user", f"cannot switch to {pw.pw_name!r} without root; fix: start the wrapper as root")
    else:
        try:
            os.initgroups(pw.pw_name, pw.pw_gid)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
        except OSError as err:
            raise StepFailed("user", f"cannot switch to {pw.pw_name!r}: {err.strerror}") from None
    env["HOME"] = pw.pw_dir
    env["USER"] = env["LOGNAME"] = pw.pw_name


class Busy(Exception):
    """Another runner of this slot is alive (see appliance/singleton.py)."""


def _take_lock(request: Request) -> None:
    """Hold the slot's lock across exec, so no second runner ever runs beside a live one."""
    def say(text: str) -> None:
        print(f"appliance.slot.exec: {text}", file=sys.stderr, flush=True)

    try:
        singleton.hold(request.lock, request.slot, request.lock_wait, say)
    except singleton.Busy as err:
        raise Busy(str(err)) from None
    except OSError as err:
        raise StepFailed("lock", f"cannot take {request.lock}: {err.strerror or err}; "
                                 "fix: check that its directory is writable by root") from None


def run(request: Request) -> None:
    """Apply the slot to this process and exec the command; returns only by raising."""
    if request.lock:
        _take_lock(request)
    pw = _lookup_user(request.user) if request.user else None
    try:
        cgroup = SlotCgroup(request.slot)
        cgroup.setup(request.cpus, request.mems, request.memory_bytes, request.pids_limit)
        if pw is not None and pw.pw_uid != 0:
            cgroup.delegate_job(pw.pw_uid, pw.pw_gid)
        cgroup.join("runner")
    except (CgroupError, ValueError) as err:
        raise StepFailed("cgroup", str(err)) from None

    try:
        os.sched_setaffinity(0, request.cpus)
    except OSError as err:
        raise StepFailed(
            "affinity",
            f"cannot pin to CPUs {format_cpu_list(request.cpus)}: {err.strerror}; "
            f"fix: use CPUs from {format_cpu_list(sorted(os.sched_getaffinity(0)))}",
        ) from None

    try:
        private_shm(request.shm_bytes)
    except (ShmError, ValueError) as err:
        raise StepFailed("shm", str(err)) from None

    env = slot_environment(request, dict(os.environ))
    env[NS_ENV] = mount_namespace()  # where the slot's /dev/shm is: the runner renews it after each job
    if pw is not None:
        _drop_to(pw, env)

    try:
        os.execvpe(request.command[0], request.command, env)
    except OSError as err:
        raise StepFailed(
            "exec", f"cannot run {request.command[0]!r}: {err.strerror}; fix: check the command and PATH"
        ) from None


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except Busy as err:
        print(f"appliance.slot.exec: {err}", file=sys.stderr)
        return singleton.EXIT_BUSY
    except StepFailed as err:
        print(f"appliance.slot.exec: {err.step} failed: {err}", file=sys.stderr)
    except Exception as err:  # last resort: still one line, no traceback
        print(f"appliance.slot.exec: unexpected {type(err).__name__}: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
