"""The warm interpreter: the next workload's Python, started ahead of time (launcher.py uses it).

A trivial job spends most of its start in the interpreter's own start-up (about 9 ms here,
more with a large venv's site-packages). So while a slot is idle, the runner starts the venv's
interpreter with `STUB` (as the workload's account, moved into a fresh job cgroup), which
does what `python` does at start-up - site, the venv's .pth files - then waits on a socket.
When a job comes whose command, environment and account match, the runner sends it the job
(argv, cwd, env, and its output file as a descriptor) and the stub becomes the workload: output
on fds 1 and 2, cwd, os.environ, sys.argv, sys.path[0], then the script runs in `__main__` as
`python script.py` would run it (`__file__`, `__loader__`, tracebacks without the stub's
frames, "can't open file" and exit code 2 for a missing script), or `-m module` through runpy
as `python -m` does.

When it serves (`serves`): the job's argv is [the same interpreter, script | -m module, ...];
the job's environment, less the variables that name the job's own folders (`PER_JOB`), is the
one the interpreter started with (so every PYTHON* variable, the locale, and whatever a .pth
file may read were the same at start-up); the same account. Otherwise the runner starts the
workload the cold way, exactly as before. The stub is the runner's own text (argv of `-c`);
nothing of a request reaches it but through the socket, after it runs as the workload's
account: no root process runs a byte of the venv.

The interpreter is started directly as the workload's account (`as_account`: setgroups([]),
setgid, setuid, umask 077, its own session, and SIGKILL when the runner ends, all set by
util-linux's setpriv before it execs the interpreter) - no launcher process in between, which
costs as much CPU as the interpreter - and sets oom_score_adj itself before anything else (and
PDEATHSIG, where no setpriv started it); a second thread of the runner moves it into a fresh
job cgroup meanwhile.

What a workload can tell: `/proc/self/cmdline` shows the stub's command line (sys.orig_argv is
the job's), two frames of the stub sit below its `<module>` in `inspect.stack()`, `marshal`,
`_socket` and `time` are already imported (and `_ctypes` where no setpriv started it), the
variables of `os.environ` that it started with come first in its order, and its start-up ran
before the job came (so a .pth file printing at start-up prints nowhere).
`runner.warm_interpreter = false` turns it off.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

# Variables the runner sets per job (launch.workload_env): they differ from job to job and the
# interpreter does not read them at start-up in a venv (no user site), so they do not count.
PER_JOB = frozenset({"STUDIOML_EXPERIMENT", "STUDIOML_ARTIFACT_MAPPING", "TMPDIR", "HOME"})


def startup_env(env: Mapping[str, str]) -> dict[str, str]:
    """What the warm interpreter starts with for jobs with environment `env`."""
    return {k: v for k, v in env.items() if k not in PER_JOB}


def serves(python: str, env: Mapping[str, str], user, argv: list[str], job_env: Mapping[str, str],
           job_user) -> bool:
    """Whether an interpreter warmed as (python, env, user) may become the workload `argv`."""
    if len(argv) < 2 or argv[0] != python or user != job_user:
        return False
    head = argv[1]
    if head == "-m":
        if len(argv) < 3 or not argv[2] or argv[2].startswith("-"):
            return False
    elif not head or head.startswith("-"):
        return False
    return startup_env(job_env) == dict(env)


# argv: -c STUB <runner pid> <socket fd> <1: setpriv set its parent-death signal, 0: not>.
# Everything lives in one function, whose globals are the __main__ dict it hands to the script;
# tracebacks drop its frame.
STUB = r'''# appliance: a warm interpreter, waiting for its slot's next job (appliance/runner/warm.py)
def _warm():
    import marshal, os, sys, time, _socket  # no more: each import is every job's CPU and memory
    parent, fd = int(sys.argv[1]), int(sys.argv[2])
    if sys.argv[3] != "1":  # it dies with its runner: PR_SET_PDEATHSIG, SIGKILL
        import _ctypes

        class Libc:
            _handle = _ctypes.dlopen(None)

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO

        Function(("prctl", Libc))(1, 9, 0, 0, 0)
        del Libc, Function, _ctypes
    if os.getppid() != parent:
        os._exit(137)
    try:  # the kernel's first pick when the slot runs out of memory, never the runner
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    # the compiler's first use in a process costs ~0.6 ms of page faults and arena growth: paid
    # here, while the slot waits, not between the job's hand-over and its first instruction
    compile("pass", "<warm>", "exec")
    ch = _socket.socket(fileno=fd)
    ch.sendall(b"W")
    data, anc, _flags, _addr = ch.recvmsg(1 << 16, _socket.CMSG_SPACE(16))
    fds = []
    for level, kind, raw in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += [int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, len(raw) - 3, 4)]
    if len(data) < 8 or len(fds) != 1 or os.getppid() != parent:
        os._exit(0)
    size, data = int.from_bytes(data[:8], "big"), data[8:]
    while len(data) < size:
        more = ch.recv(size - len(data))
        if not more:
            os._exit(0)
        data += more
    spec = marshal.loads(data)
    os.dup2(fds[0], 1)
    os.dup2(fds[0], 2)
    os.close(fds[0])
    os.chdir(spec["cwd"])
    env = spec["env"]  # the one it started with but for PER_JOB's variables: set what differs
    for k in [k for k in os.environ if k not in env]:
        del os.environ[k]
    for k, v in env.items():
        if os.environ.get(k) != v:
            os.environ[k] = v
    time.tzset()
    argv = spec["argv"]
    if hasattr(sys, "orig_argv"):
        sys.orig_argv[:] = argv
    safe = getattr(sys.flags, "safe_path", False)  # -P: no folder of the script goes first
    ch.sendall(b".")
    ch.close()
    del data, anc, fds, spec, ch, env
    import builtins
    main = sys.modules["__main__"].__dict__
    main.clear()
    main.update(__name__="__main__", __doc__=None, __package__=None, __spec__=None, __annotations__={},
                __builtins__=builtins)
    try:
        if argv[1] == "-m":
            import runpy
            sys.argv[:] = ["-m", *argv[3:]]
            if not safe:
                sys.path[0] = os.getcwd()
            runpy._run_module_as_main(argv[2], alter_argv=True)
            return
        sys.argv[:] = argv[1:]
        path = os.path.abspath(argv[1])
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError as e:
            sys.stderr.write(f"{sys.executable}: can't open file {path!r}: [Errno {e.errno}] {e.strerror}\n")
            raise SystemExit(2)
        if not safe:
            sys.path[0] = os.path.dirname(os.path.realpath(path))
        main.update(__file__=path, __cached__=None,  # the loader python gives a script
                    __loader__=sys.modules["_frozen_importlib_external"].SourceFileLoader("__main__", path))
        exec(compile(source, path, "exec"), main)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        e.__traceback__ = e.__traceback__.tb_next  # from the script's own frame on
        sys.excepthook(type(e), e, e.__traceback__)
        raise SystemExit(1)
_warm()
'''


# util-linux's setpriv: changes the account, then execs. subprocess changes it itself only in a
# fork() of the runner (no vfork once user/group is given): copying the runner's page tables,
# after which every page the runner writes faults once. Measured here for a runner-sized
# process: Popen 3.6 -> 0.3 ms of the runner's time, its CPU 2.7 -> 0.3 ms per job.
SETPRIV = next((p for p in ("/usr/bin/setpriv", "/bin/setpriv") if os.access(p, os.X_OK)), None)


def as_account(argv: list[str], user: Optional[tuple]) -> tuple[list[str], dict]:
    """`argv` and the Popen keywords that start it as `user` ((uid, gid), no supplementary
    groups; None: the runner's own account): through setpriv where the box has it, else as
    subprocess does it. Through setpriv, it also gets SIGKILL when its parent ends."""
    if not user:
        return argv, {}
    uid, gid = int(user[0]), int(user[1])
    if not _through_setpriv(user):
        return argv, {"user": uid, "group": gid, "extra_groups": []}
    return [SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--pdeathsig=SIGKILL", "--", *argv], {}


def warm_command(python: str, runner_pid: int, fd: int, user: Optional[tuple]) -> tuple[list[str], dict]:
    """The warm interpreter's argv and Popen keywords (as_account). Where setpriv sets its
    parent-death signal, the stub need not: it then never loads _ctypes (~0.2 MB in the slot's
    waiting interpreter and in every job it becomes)."""
    dies_with_runner = "1" if _through_setpriv(user) else "0"
    return as_account([python, "-c", STUB, str(runner_pid), str(fd), dies_with_runner], user)


def _through_setpriv(user: Optional[tuple]) -> bool:
    """Whether as_account starts a process for `user` through setpriv."""
    return bool(user) and SETPRIV is not None


def job_spec(argv: list[str], cwd: str, env: Mapping[str, str]) -> bytes:
    """The message the stub reads: its size, then the marshalled job."""
    import marshal
    data = marshal.dumps({"argv": list(argv), "cwd": str(cwd), "env": dict(env)})
    return len(data).to_bytes(8, "big") + data
