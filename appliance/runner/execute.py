"""Run one workload process inside the slot and say how it ended.

`cd workspace; python <filename> <args>` with stdout and stderr appended to the file that
becomes the `output` artifact. The runner already runs within the slot's cpuset and memory
limit; the workload additionally joins the slot's `job` leaf cgroup (when the runner is in a
slot) so an out-of-memory kill hits the workload, never the runner, and can be counted.

The workload gets its own session (process group): a timeout or a drain stops the whole
group, SIGTERM first (so it can checkpoint into `modeldir`), SIGKILL after a grace period.
It also gets PR_SET_PDEATHSIG=SIGKILL, so a runner killed with SIGKILL does not leave its
workload running unsupervised; the job then runs again when the message is recovered.

Everything here is single-threaded: one poll loop that waits on the process with a short
timeout, calling back for keepalives and periodic uploads.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from appliance.process import (CANCELLED, HUNG, INTERRUPTED, OVER_GPU_SHARE, TIMED_OUT, Supervision,  # noqa: F401
                               base_env, signal_group, supervise)

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


def job_cgroup(slot: Optional[str]) -> Optional[str]:
    """`slot` if its job cgroup exists on this host (process backend), else None: no slot
    (dev, tests), or the docker backend, where the container itself is the slot."""
    if not slot:
        return None
    try:
        from appliance.slot import cgroup
        cg = cgroup.SlotCgroup(slot)
        return slot if os.path.isdir(cg.path(cg.hierarchy.memory, "job")) else None
    except Exception:
        return None


def _job_file(slot: str, root: Optional[str], name: str) -> Optional[str]:
    from appliance.slot import cgroup
    if not root:
        return None
    try:
        with open(os.path.join(cgroup.SlotCgroup(slot).path(root, "job"), name)) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def job_cpu_seconds(slot: Optional[str]) -> Optional[float]:
    """CPU time charged to the slot's job cgroup so far (v2 cpu.stat, v1 cpuacct.usage), or None."""
    if not slot:
        return None
    from appliance.slot import cgroup
    h = cgroup.current_hierarchy()
    if h.version == "v2":
        text = _job_file(slot, h.cpuset, "cpu.stat") or ""
        usec = next((int(v) for k, _, v in (ln.partition(" ") for ln in text.splitlines())
                     if k == "usage_usec" and v.strip().isdigit()), None)
        return usec / 1e6 if usec is not None else None
    text = (_job_file(slot, h.cpuacct, "cpuacct.usage") or "").strip()
    return int(text) / 1e9 if text.isdigit() else None


def job_peak_memory(slot: Optional[str]) -> Optional[int]:
    """Peak memory of the slot's job cgroup (v1 memory.max_usage_in_bytes, v2 memory.peak), or None."""
    if not slot:
        return None
    from appliance.slot import cgroup
    h = cgroup.current_hierarchy()
    name = "memory.peak" if h.version == "v2" else "memory.max_usage_in_bytes"
    text = (_job_file(slot, h.memory, name) or "").strip()
    return int(text) if text.isdigit() else None


def reset_job_peak(slot: Optional[str]) -> None:
    """Start the job cgroup's memory peak afresh (v1; v2 from Linux 6.12): the leaf serves every job."""
    if not slot:
        return
    from appliance.slot import cgroup
    h = cgroup.current_hierarchy()
    name = "memory.peak" if h.version == "v2" else "memory.max_usage_in_bytes"
    try:
        with open(os.path.join(cgroup.SlotCgroup(slot).path(h.memory, "job"), name), "w") as f:
            f.write("0")
    except (OSError, ValueError):
        pass


def _leader_ticks(pid: int) -> Optional[int]:
    """utime + stime of one process (no job cgroup to ask)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


class Usage:
    """What one workload used: CPU seconds and peak memory from its job cgroup, or from
    getrusage of the runner's children when there is no cgroup (no slot: tests, `python=`)."""

    def __init__(self, slot: Optional[str]):
        import resource
        self.slot = slot
        reset_job_peak(slot)
        self.cpu0 = job_cpu_seconds(slot)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.ru0 = ru.ru_utime + ru.ru_stime
        self.started = time.time()

    def cpu_now(self) -> float:
        import resource
        cpu = job_cpu_seconds(self.slot)
        if cpu is not None and self.cpu0 is not None:
            return cpu - self.cpu0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime - self.ru0

    def report(self) -> dict:
        import resource
        peak = job_peak_memory(self.slot)
        if peak is None:  # largest child ever: an upper bound only when the runner had bigger ones
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        return {"cpu_seconds": round(self.cpu_now(), 3), "peak_memory_bytes": peak,
                "wall_seconds": round(time.time() - self.started, 3)}


def oom_kills(slot: Optional[str]) -> Optional[int]:
    """OOM kill count of the slot's job cgroup, or None when there is no cgroup to ask."""
    if not slot:
        return None
    try:
        from appliance.slot import cgroup
        return int(cgroup.SlotCgroup(slot).oom_kills())
    except Exception:
        return None


def kill_job_leftovers(slot: Optional[str]) -> int:
    """SIGKILL whatever the workload left in the slot's job cgroup (a daemon in a session of
    its own escapes the process-group kill, never the cgroup). The number killed."""
    if not slot:
        return 0
    try:
        from appliance.slot import cgroup
        return cgroup.SlotCgroup(slot).kill_leaf("job")
    except Exception:
        return 0


def container_oom_kills() -> Optional[int]:
    """OOM kills in the memory cgroup of the container we run in (docker backend: the
    container is the slot, and its own cgroup is what /sys/fs/cgroup shows); None if unknown."""
    for path in ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"):
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def in_container() -> bool:
    """Whether we run inside a docker (or podman) container."""
    return os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")


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


# The launcher process (`python -I -S -c _LAUNCHER <runner pid>`, started with vfork: no
# preexec_fn). It first does what _preexec does in a forked child: PDEATHSIG=SIGKILL, exit if
# the runner is already gone, oom_score_adj 1000 (the runner joins it to the job cgroup from
# outside, see Launcher.warm), then answers "R" on stdout. Then it waits for one JSON line on
# stdin ({argv, cwd, env, output, user}) and becomes the workload the way subprocess.Popen would
# have started it: stdin /dev/null, stdout and stderr appended to the output file, cwd,
# signals Python ignores back to their defaults, umask 077, the workload's uid:gid (no
# supplementary groups; PDEATHSIG set again, since a uid change clears it), argv[0] looked up
# on the env's PATH. On
# stdout it answers "." right before the exec, and [errno, strerror, filename] if that
# failed; the exec closes that descriptor (close-on-exec).
_LAUNCHER = """\
import ctypes, json, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(137)
try:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
except OSError:
    pass
os.write(1, b"R")
spec = sys.stdin.buffer.readline()
if not spec:
    os._exit(0)
status = os.dup(1)
name = None
try:
    s = json.loads(spec)
    fd = os.open(s["output"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    name = s["cwd"]
    os.chdir(name)
    for sig in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):
        if hasattr(signal, sig):
            signal.signal(getattr(signal, sig), signal.SIG_DFL)
    os.umask(0o077)
    if s.get("user"):
        uid, gid = s["user"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != int(sys.argv[1]):
            os._exit(137)
    name = s["argv"][0]
    os.write(status, b".")
    os.execvpe(name, s["argv"], s["env"])
except OSError as e:
    os.write(status, json.dumps([e.errno, e.strerror, name]).encode())
os._exit(127)
"""


class Launcher:
    """Starts the next workload process ahead of time, while the runner is idle.

    Forking the runner (a big Python process) with a `preexec_fn` costs 15-20 ms before the
    workload even starts its interpreter. `warm()` instead starts a small waiting process
    (`_LAUNCHER`, through vfork: cheap for the runner) that sets itself up as `_preexec`
    would, and joins it to the slot's job cgroup; `launch()` then hands it the workload,
    which it execs at once. The workload ends up exactly as `spawn` would start it: a child
    of the runner, leader of its own session, in the job cgroup (joined before the workload
    existed), PDEATHSIG=SIGKILL, oom_score_adj 1000, a failed cgroup join reported in its
    output.

    Anything wrong with the waiting process (it died, it was never started) makes
    `launch()` return None and the caller forks as before: nothing depends on it.
    """

    def __init__(self, slot: Optional[str], python: Optional[str] = None):
        import sys
        self.slot = slot
        self.python = python or sys.executable
        self.proc: Optional[subprocess.Popen] = None
        self.warning = b""  # _preexec's words on a failed cgroup join, for the output

    def warm(self) -> None:
        """Have a launcher process waiting (call when idle)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self._discard()
        try:
            self.proc = subprocess.Popen(
                [self.python, "-I", "-S", "-c", _LAUNCHER, str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                cwd="/", env={}, start_new_session=True, close_fds=True)
        except (OSError, subprocess.SubprocessError):
            self.proc = None
            return
        self.warning = b""
        if self.slot:
            try:
                from appliance.slot import cgroup
                cgroup.SlotCgroup(self.slot).join("job", pid=self.proc.pid)
            except Exception as e:  # still inside the slot's limits, via the runner's cgroup
                self.warning = (f"appliance: warning: cannot join the job cgroup of slot "
                                f"{self.slot}: {e}\n").encode()

    def launch(self, argv: list[str], cwd: Path, env: Mapping[str, str], out,
               user: Optional[tuple] = None) -> Optional[subprocess.Popen]:
        """The waiting process turned into the workload; None if there was none (fork then).
        Raises OSError as subprocess.Popen does when argv[0] or cwd cannot be used."""
        import json
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            self._discard(proc)
            return None
        try:
            if proc.stdout.read(1) != b"R":  # not ready: it died (or the runner's pid changed)
                self._discard(proc)
                return None
            if self.warning:
                out.write(self.warning)
            out.flush()
            spec = {"argv": list(argv), "cwd": str(cwd), "env": dict(env),
                    "output": os.path.abspath(out.name), "user": list(user) if user else None}
            proc.stdin.write(json.dumps(spec).encode() + b"\n")
            proc.stdin.close()
            answer = proc.stdout.read()
        except (OSError, ValueError):
            self._discard(proc)
            return None
        if not answer.startswith(b"."):  # it died before it could start the workload
            self._discard(proc)
            return None
        proc.stdout.close()
        proc.stdin = proc.stdout = None
        proc.args = list(argv)
        if answer != b".":
            proc.wait()
            errno_, strerror, name = json.loads(answer[1:])
            raise OSError(errno_, strerror, name)
        return proc

    def _discard(self, proc: Optional[subprocess.Popen] = None) -> None:
        proc = proc or self.proc
        if proc is self.proc:
            self.proc = None
        if proc is None:
            return
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        if proc.poll() is None:
            signal_group(proc.pid, signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        """No more jobs: the waiting process exits (EOF on its stdin)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._discard(proc)


def classify(rc: int, stopped_for: Optional[str], oom_before: Optional[int],
             oom_after: Optional[int], slot: Optional[str] = None, stopped_reason: str = "") -> Result:
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


def run_workload(argv: list[str], cwd: Path, env: Mapping[str, str], output: Path,
                 sv: Supervision, slot: Optional[str] = None,
                 on_start: Callable[[subprocess.Popen], None] = lambda p: None,
                 container_slot: Optional[str] = None,
                 launcher: Optional[Launcher] = None, user: Optional[tuple] = None,
                 on_end: Callable[[], None] = lambda: None) -> Result:
    """Run `argv` in `cwd`, output appended to `output`; never raises for the workload's
    own failures (a missing interpreter is a FAILED result too). `slot` names the slot whose
    job cgroup the workload joins; `container_slot` the slot whose container we run in
    (docker backend), whose own cgroup then counts the OOM kills. `launcher`: start it
    through that Launcher's waiting process when it has one (see Launcher). `on_end` is called
    when the workload's process has ended, before what it left in the job cgroup is killed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if container_slot and not slot:
        count_ooms, slot_name = container_oom_kills, container_slot
    else:
        count_ooms, slot_name = (lambda: oom_kills(slot)), slot
    before = count_ooms()
    usage = Usage(slot)
    with open(output, "ab") as out:
        try:
            proc = spawn(argv, cwd, env, out, slot, launcher, user)
        except (OSError, subprocess.SubprocessError) as e:
            msg = f"cannot start {argv[0]}: {e}"
            out.write(f"appliance: {msg}\n".encode())
            return Result(FAILED, None, msg)
        on_start(proc)
        if sv.hang_after_s > 0:
            sv.progress = lambda: (usage.cpu_now() if usage.cpu0 is not None else _leader_ticks(proc.pid),
                                   output.stat().st_size)
        rc, stopped_for = supervise(proc, sv)
        on_end()
        kill_job_leftovers(slot)
        result = classify(rc, stopped_for, before, count_ooms(), slot_name, sv.stopped_reason)
        result.usage = usage.report()
        if not result.ok:
            out.write(f"\nappliance: {result.outcome}: {result.reason}\n".encode())
    return result
