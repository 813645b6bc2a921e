"""The Launcher: the next workload process, started ahead of time while the runner is idle
(used by execute.run_workload, which re-exports it).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Mapping, Optional

from appliance.process import signal_group


# The launcher process (`python -I -S -c _LAUNCHER <runner pid>`, started with vfork: no
# preexec_fn). It first does what _preexec does in a forked child: PDEATHSIG=SIGKILL, exit if
# the runner is already gone, oom_score_adj 1000 (the runner joins it to the job cgroup from
# outside, see Launcher.warm), then answers "R" on stdout. Then it reads one job on stdin (its
# size in 8 bytes, then {argv, cwd, env, output, user} marshalled: the runner's own interpreter
# reads it, and marshal costs no import) and becomes the workload the way subprocess.Popen would
# have started it: stdin /dev/null, stdout and stderr appended to the output file, cwd,
# signals Python ignores back to their defaults, umask 077, the workload's uid:gid (no
# supplementary groups; PDEATHSIG set again, since a uid change clears it), argv[0] looked up
# on the env's PATH. On stdout it answers "." right before the exec, and (errno, strerror,
# filename) marshalled if that failed; the exec closes that descriptor (close-on-exec). It
# imports only what costs nothing to load (no json, no signal.py): it starts for every job.
_LAUNCHER = """\
import ctypes, marshal, os, sys, _signal
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, _signal.SIGKILL, 0, 0, 0)
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
def read(n):
    data = b""
    while len(data) < n:
        more = os.read(0, n - len(data))
        if not more:
            os._exit(0)
        data += more
    return data
spec = read(int.from_bytes(read(8), "big"))
status = os.dup(1)
name = None
try:
    s = marshal.loads(spec)
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
        if hasattr(_signal, sig):
            _signal.signal(getattr(_signal, sig), _signal.SIG_DFL)
    os.umask(0o077)
    if s.get("user"):
        uid, gid = s["user"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        ctypes.CDLL(None, use_errno=True).prctl(1, _signal.SIGKILL, 0, 0, 0)
        if os.getppid() != int(sys.argv[1]):
            os._exit(137)
    name = s["argv"][0]
    os.write(status, b".")
    os.execvpe(name, s["argv"], s["env"])
except OSError as e:
    os.write(status, marshal.dumps((e.errno, e.strerror, name)))
os._exit(127)
"""


class Launcher:
    """Starts the next workload process ahead of time, while the runner is idle.

    Forking the runner (a big Python process) with a `preexec_fn` costs 15-20 ms before the
    workload even starts its interpreter. `warm()` instead starts a small waiting process
    (`_LAUNCHER`, through vfork: cheap for the runner) that sets itself up as `_preexec`
    would, and puts it in a new job cgroup, made now while nothing waits on it; `launch()`
    then hands it the workload, which it execs at once. The workload ends up exactly as `spawn`
    would start it: a child of the runner, leader of its own session, in a fresh job cgroup
    (joined before the workload existed), PDEATHSIG=SIGKILL, oom_score_adj 1000, a failed
    cgroup join reported in its output.

    `warm(python, env, user)` goes one step further (warm.py): the waiting process becomes that
    interpreter, as the workload's account, and waits for a job it serves; any other job
    discards it and is forked the cold way.

    Anything wrong with the waiting process (it died, it was never started) makes
    `launch()` return None and the caller forks as before: nothing depends on it.
    """

    def __init__(self, slot: Optional[str], python: Optional[str] = None):
        import sys
        self.slot = slot
        self.python = python or sys.executable
        self.proc: Optional[subprocess.Popen] = None
        self.warning = b""  # _preexec's words on a failed cgroup join, for the output
        self.warm_as: Optional[tuple] = None  # (python, env, user) of a warm interpreter
        self.channel = None  # the runner's end of the warm interpreter's socket
        self.fresh_leaf = False  # the job cgroup was made for the waiting process alone
        self._mover = None  # the thread that moves it into its cgroup (warm)
        self._placed = None  # that move, under way

    def warm(self, python: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
             user: Optional[tuple] = None) -> None:
        """Have a launcher process waiting (call when idle); with `python` and `env`, a warm
        interpreter for the jobs it serves (warm.serves)."""
        want = (python, dict(env or {}), tuple(user) if user else None) if python else None
        if self.proc is not None and self.proc.poll() is None and want == self.warm_as:
            return
        self._discard()
        theirs = None
        try:
            if want:  # the interpreter itself, as the workload's account from its first instruction
                import socket
                from appliance.runner import warm
                self.channel, theirs = socket.socketpair()
                argv, account = warm.warm_command(want[0], os.getpid(), theirs.fileno(), want[2])
                self.proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", env=want[1],
                    start_new_session=True, close_fds=True, pass_fds=(theirs.fileno(),), umask=0o077,
                    **account)
            else:
                self.proc = subprocess.Popen(
                    [self.python, "-I", "-S", "-c", _LAUNCHER, str(os.getpid())],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    cwd="/", env={}, start_new_session=True, close_fds=True)
        except (OSError, subprocess.SubprocessError):
            self._discard()
            return
        finally:
            if theirs is not None:
                theirs.close()
        self.warning, self.warm_as, self.fresh_leaf = b"", want, False
        # a cgroup move waits for the kernel (milliseconds on cgroup v1): done by a second thread,
        # so the runner claims and fetches the next job meanwhile; ready() waits for it
        if self._mover is None:
            from concurrent.futures import ThreadPoolExecutor
            self._mover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="launcher")
        self._placed = self._mover.submit(self._place, self.proc)

    def _place(self, proc: subprocess.Popen) -> bool:
        """The waiting process into a new job cgroup."""
        if self.slot:
            try:
                from appliance.slot import cgroup
                cg = cgroup.SlotCgroup(self.slot)
                try:  # a new, empty job leaf now, so that the job does not wait for one (the
                    cg.fresh_job(None)  # launcher, born in the runner's leaf, is not in the old one)
                    self.fresh_leaf = True
                except Exception:  # noqa: BLE001 - the leaf there serves; the job's start makes another
                    pass
                cg.join("job", pid=proc.pid)
            except Exception as e:  # still inside the slot's limits, via the runner's cgroup
                self.warning = (f"appliance: warning: cannot join the job cgroup of slot "
                                f"{self.slot}: {e}\n").encode()
        return True

    def ready(self) -> bool:
        """Wait until the waiting process is in its cgroup; False when there is none."""
        placed, self._placed = self._placed, None
        if placed is not None and not placed.result():
            self._discard()
        return self.proc is not None

    @staticmethod
    def _send(proc: subprocess.Popen, argv, cwd, env, output: str, user) -> bool:
        """The launcher's one job: what to exec, where, as whom, output appended to `output`."""
        import marshal
        spec = marshal.dumps({"argv": list(argv), "cwd": str(cwd), "env": dict(env), "output": output,
                              "user": list(user) if user else None})
        try:
            proc.stdin.write(len(spec).to_bytes(8, "big") + spec)
            proc.stdin.close()
            return True
        except (OSError, ValueError):
            return False

    def launch(self, argv: list[str], cwd: Path, env: Mapping[str, str], out,
               user: Optional[tuple] = None) -> Optional[subprocess.Popen]:
        """The waiting process turned into the workload; None if there was none (fork then).
        Raises OSError as subprocess.Popen does when argv[0] or cwd cannot be used."""
        import marshal
        self.ready()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            self._discard(proc)
            return None
        if self.warm_as is not None:
            return self._hand_over(proc, argv, cwd, env, out, user)
        try:
            if proc.stdout.read(1) != b"R":  # not ready: it died (or the runner's pid changed)
                self._discard(proc)
                return None
            if self.warning:
                out.write(self.warning)
            out.flush()
            if not self._send(proc, argv, cwd, env, os.path.abspath(out.name), user):
                self._discard(proc)
                return None
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
            errno_, strerror, name = marshal.loads(answer[1:])
            raise OSError(errno_, strerror, name)
        return proc

    def _hand_over(self, proc: subprocess.Popen, argv, cwd, env, out, user) -> Optional[subprocess.Popen]:
        """The warm interpreter becomes the workload, if it serves it; None otherwise (discarded)."""
        import array
        import socket
        from appliance.runner import warm
        python, warm_env, warm_user = self.warm_as
        channel = self.channel
        if not warm.serves(python, warm_env, warm_user, list(argv), env, tuple(user) if user else None):
            self._discard(proc)
            return None
        try:
            if proc.poll() is not None or channel.recv(1) != b"W":  # the interpreter did not come up
                self._discard(proc)
                return None
            if self.warning:
                out.write(self.warning)
            out.flush()
            channel.sendmsg([warm.job_spec(argv, str(cwd), env)],
                            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [out.fileno()]))])
            started = channel.recv(1) == b"."
        except OSError:
            started = False
        if not started:  # it died before it took the job: nothing of the job ran
            self._discard(proc)
            return None
        channel.close()
        self.channel = None
        proc.args = list(argv)
        return proc

    def _discard(self, proc: Optional[subprocess.Popen] = None) -> None:
        placed, self._placed = self._placed, None
        if placed is not None:
            placed.result()  # not killed while it is being moved
        proc = proc or self.proc
        if proc is self.proc:
            self.proc = None
        if self.channel is not None and self.proc is None:
            self.channel.close()
            self.channel = None
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
        """No more jobs: the waiting process exits (EOF on its stdin, or on its socket)."""
        self.ready()
        if self._mover is not None:
            self._mover.shutdown()
            self._mover = None
        proc, self.proc = self.proc, None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if proc is None:
            return
        try:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._discard(proc)
