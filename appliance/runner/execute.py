"""Run one workload process inside the slot and say how it ended.

`cd workspace; python <filename> <args>` with stdout and stderr appended to the file that
becomes the `output` artifact. The runner already runs within the slot's cpuset and memory
limit; the workload additionally joins the slot's `job` leaf cgroup (when the runner is in a
slot) so an out-of-memory kill hits the workload, never the runner, and can be counted. That
leaf is made anew for each workload (`fresh_job_cgroup`), with the request's `ram` as its
memory limit: its peak memory and OOM count are the workload's own, not the environment
build's or an earlier job's. After the workload, what it left goes: its processes, and
everything in the slot's /dev/shm (`end_job`).

The workload gets its own session (process group): a timeout or a drain stops the whole
group, SIGTERM first (so it can checkpoint into `modeldir`), SIGKILL after a grace period.
It also gets PR_SET_PDEATHSIG=SIGKILL, so a runner killed with SIGKILL does not leave its
workload running unsupervised; the job then runs again when the message is recovered.

Everything here is single-threaded: one poll loop that waits on the process with a short
timeout, calling back for keepalives and periodic uploads. The job's cgroup and what the job
used are in jobcgroup.py; the process started ahead of time, in launcher.py.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from appliance.process import (  # noqa: F401  (importers find them here too)
    CANCELLED, HUNG, INTERRUPTED, OVER_GPU_SHARE, TIMED_OUT, Supervision, base_env, reap, signal_group, supervise,
)
from appliance.runner.jobcgroup import (  # noqa: F401  (moved there; importers find them here too)
    MemoryWatch, Usage, _mib, container_oom_kills, end_job, fresh_job_cgroup, in_container, job_cgroup,
    job_cpu_seconds, job_peak_memory, kill_job_leftovers, kill_user_processes, oom_kills, reset_job_peak,
)
from appliance.runner.launcher import Launcher  # noqa: F401

SUCCESS = "success"
FAILED = "failed"
OUT_OF_MEMORY = "out of memory"
ENV_FAILED = "environment failed"  # the Python environment could not be built


@dataclass
class Result:
    outcome: str
    exit_code: Optional[int]
    reason: str
    detail: str = ""  # more text for the failure class only (pip's error), not shown as the reason
    usage: Optional[dict] = None  # cpu_seconds, peak_memory_bytes, wall_seconds of the workload

    @property
    def ok(self) -> bool:
        return self.outcome == SUCCESS


# --- environment -------------------------------------------------------------------------

_VAR = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")


def expand(value: str, env: Mapping[str, str]) -> str:
    """StudioML's `%VAR%` expansion; an unknown variable expands to the empty string."""
    return _VAR.sub(lambda m: env.get(m.group(1), ""), value)


def workload_env(environ: Mapping[str, str], config_env: Mapping[str, object],
                 extra: Mapping[str, str] = ()) -> dict[str, str]:
    """base_env(environ), then `extra` (venv, experiment paths), then the request's
    `config.env`, each value `%VAR%`-expanded against the environment built so far (never
    against the runner's secrets, which are not in it)."""
    env = base_env(environ)
    env.setdefault("PATH", os.defpath)
    env["PYTHONUNBUFFERED"] = "1"  # so `appliance logs -f` sees lines as they come
    env.update(dict(extra))
    for k, v in (config_env or {}).items():
        if v is None:
            continue
        env[str(k)] = expand(str(v), env)
    return env


# --- process control ---------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _drop_privileges(user: Optional[tuple], parent: int) -> None:
    """Become the workload's uid (in a child about to exec). A credential change clears
    PDEATHSIG, so it is set again, and the runner's death in between is checked once more."""
    if not user:
        return
    uid, gid = user
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(137)


def _preexec(slot: Optional[str], parent: int, user: Optional[tuple] = None) -> Callable[[], None]:
    join = None
    if slot:
        try:
            from appliance.slot import cgroup
            join = cgroup.join_job
        except ImportError:
            join = None

    def child() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except Exception:
            pass
        if os.getppid() != parent:  # the runner died before prctl took effect
            os._exit(137)
        try:  # when the slot runs out of memory the kernel takes the workload, not the runner
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        if join is not None:
            try:
                join(slot)
            except Exception as e:  # still inside the slot's limits, via the runner's cgroup
                os.write(2, f"appliance: warning: cannot join the job cgroup of slot {slot}: "
                            f"{e}\n".encode())
        os.umask(0o077)
        _drop_privileges(user, parent)

    return child


def _leader_ticks(pid: int) -> Optional[int]:
    """utime + stime of one process (no job cgroup to ask)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def process_start_ticks(pid: int) -> Optional[int]:
    """Start time of `pid` (clock ticks since boot): with the pid, names a process uniquely."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def kill_leftover(workload: Optional[dict]) -> bool:
    """Kill the process group a previous runner of this slot left behind (it was killed
    before it could stop its workload). True if something was killed."""
    if not workload or not workload.get("pid"):
        return False
    pid = int(workload["pid"])
    if process_start_ticks(pid) != workload.get("start_ticks"):
        return False  # gone, or the pid now belongs to someone else
    signal_group(pid, signal.SIGKILL)
    return True


def spawn(argv: list[str], cwd: Path, env: Mapping[str, str], out, slot: Optional[str],
          launcher: Optional["Launcher"] = None, user: Optional[tuple] = None) -> subprocess.Popen:
    """The workload process: through `launcher`'s process started ahead of time if it has
    one, else forked now (the same setup either way: `_preexec`). `user` is (uid, gid) to run
    as, None to stay the runner's user."""
    if launcher is not None:
        proc = launcher.launch(argv, cwd, env, out, user)
        if proc is not None:
            return proc
    return subprocess.Popen(
        argv, cwd=str(cwd), env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
        stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_preexec(slot, os.getpid(), user), close_fds=True)


def classify(rc: int, stopped_for: Optional[str], oom_before: Optional[int],
             oom_after: Optional[int], slot: Optional[str] = None, stopped_reason: str = "",
             ram_bytes: Optional[int] = None) -> Result:
    if stopped_for == OVER_GPU_SHARE:
        return Result(OVER_GPU_SHARE, rc, stopped_reason or "over the slot's GPU memory share")
    if stopped_for == TIMED_OUT:
        return Result(TIMED_OUT, rc, "lifetime exceeded (experimentLifetime/max_duration)")
    if stopped_for == HUNG:
        return Result(HUNG, rc, "no CPU progress and no new output for runner.hang_after; stopped")
    if stopped_for == INTERRUPTED:
        return Result(INTERRUPTED, rc, "runner stopping (drain); the job will run again")
    if stopped_for == CANCELLED:
        return Result(CANCELLED, rc, "cancelled (appliance cancel): stopped with SIGTERM")
    if rc == 0:
        return Result(SUCCESS, 0, "")
    oomed = oom_before is not None and oom_after is not None and oom_after > oom_before
    if oomed and ram_bytes:
        return Result(OUT_OF_MEMORY, rc, f"the workload exceeded its memory limit (the request's ram, "
                                         f"{_mib(ram_bytes)}) and was killed")
    if oomed:
        where = f" of slot {slot}" if slot else ""
        return Result(OUT_OF_MEMORY, rc, f"the workload exceeded the memory limit{where} "
                                         f"and was killed")
    if rc == -signal.SIGKILL and oom_after is None:
        return Result(OUT_OF_MEMORY, rc, "the workload was killed by SIGKILL, most likely by "
                                         "the kernel's OOM killer")
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        return Result(FAILED, rc, f"killed by signal {name}")
    return Result(FAILED, rc, f"exit code {rc}")


def _first_of(*checks: Callable[[], Optional[str]]) -> Callable[[], Optional[str]]:
    """A Supervision.check that asks each of `checks` in turn."""
    return lambda: next((r for r in (c() for c in checks) if r), None)


def run_workload(argv: list[str], cwd: Path, env: Mapping[str, str], output: Path,
                 sv: Supervision, slot: Optional[str] = None,
                 on_start: Callable[[subprocess.Popen], None] = lambda p: None,
                 container_slot: Optional[str] = None,
                 launcher: Optional[Launcher] = None, user: Optional[tuple] = None,
                 on_end: Callable[[], None] = lambda: None, ram_bytes: Optional[int] = None) -> Result:
    """Run `argv` in `cwd`, output appended to `output`; never raises for the workload's
    own failures (a missing interpreter is a FAILED result too). `slot` names the slot whose
    job cgroup the workload joins; `container_slot` the slot whose container we run in
    (docker backend), whose own cgroup then counts the OOM kills. `launcher`: start it
    through that Launcher's waiting process when it has one (see Launcher). `on_end` is called
    when the workload's process has ended, before what it left in the job cgroup is killed.
    `ram_bytes` (the request's `ram`) limits the workload's memory: its job cgroup's limit
    (never above the slot's, which bounds it too); None or 0: the slot's limit."""
    output.parent.mkdir(parents=True, exist_ok=True)
    limit, warning = fresh_job_cgroup(slot, ram_bytes, launcher)
    if container_slot and not slot:
        count_ooms, slot_name = container_oom_kills, container_slot
    else:
        count_ooms, slot_name = (lambda: oom_kills(slot)), slot
    before = count_ooms()
    usage = Usage(slot)
    with open(output, "ab") as out:
        if warning:
            out.write(warning.encode())
        try:
            proc = spawn(argv, cwd, env, out, slot, launcher, user)
        except (OSError, subprocess.SubprocessError) as e:
            msg = f"cannot start {argv[0]}: {e}"
            out.write(f"appliance: {msg}\n".encode())
            return Result(FAILED, None, msg)
        on_start(proc)
        watch = None
        if ram_bytes and (not slot or warning):  # no job cgroup to hold it: watch it
            from appliance.slot.shm import in_slot_container
            watch = MemoryWatch(ram_bytes, proc.pid, user[0] if user and in_slot_container() else None)
            sv.check = _first_of(watch.check, sv.check)
        if sv.hang_after_s > 0:
            sv.progress = lambda: (usage.cpu_now() if usage.cpu0 is not None else _leader_ticks(proc.pid),
                                   output.stat().st_size)
        rc, stopped_for = supervise(proc, sv)
        on_end()
        kill_job_leftovers(slot)
        result = classify(rc, stopped_for, before, count_ooms(), slot_name, sv.stopped_reason, limit)
        if watch is not None and watch.tripped:
            result = Result(OUT_OF_MEMORY, rc, sv.stopped_reason + " and was killed")
        result.usage = usage.report(getattr(proc, "hwm", None))
        if watch is not None:
            result.usage["peak_memory_bytes"] = max(result.usage["peak_memory_bytes"] or 0, watch.peak)
        for problem in end_job(slot, user):
            out.write(f"appliance: warning: {problem}\n".encode())
        if not result.ok:
            out.write(f"\nappliance: {result.outcome}: {result.reason}\n".encode())
    return result
