"""One instance per program: a lock file each slot, the controller and the store hold while they run.

    python -m appliance.singleton --lock PATH --name NAME [--wait SECONDS] [--log FILE] -- CMD [ARGS...]

takes an exclusive flock on PATH (HOME/run/locks/NAME.lock), writes its pid into it, and
exec()s CMD with the locked descriptor inherited, so the program holds the lock for as long as
it lives, whoever its parent is. A supervisord that dies leaves its children running; the
supervisord of the next `appliance up` then cannot start a second runner beside a live one: the
new instance waits (with backoff, up to --wait seconds: the old one may be draining) and then
exits with EXIT_BUSY, naming the holder. `appliance up`/`down` find the holders (`holders`)
and stop them first (appliance/leftovers.py).

--log FILE sends CMD's stdout and stderr to FILE itself instead of to supervisord's pipe: a Go
program (the store) dies of SIGPIPE at its next log line once supervisord is gone, and the
runners draining then could not upload. FILE is rotated (to FILE.1) at start when over LOG_MAX.

The slot exec wrapper calls `hold` itself (one exec fewer per slot start). Imports stay light.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time

EXIT_BUSY = 75  # EX_TEMPFAIL: another instance holds the lock; supervisord starts us again later
DEFAULT_WAIT_S = 30.0
LOG_MAX = 20 * 1024 * 1024
USAGE = ("usage: python -m appliance.singleton --lock PATH --name NAME [--wait SECONDS] [--log FILE] "
         "-- CMD [ARGS...]")


class Busy(Exception):
    """Another live process holds the lock; the message names it and the fix."""


def lock_path(run_dir, name: str) -> str:
    """HOME/run/locks/NAME.lock."""
    return os.path.join(str(run_dir), "locks", f"{name}.lock")


def _holder_text(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def hold(path: str, name: str, wait_s: float = DEFAULT_WAIT_S, say=None, inheritable: bool = True) -> int:
    """Take the exclusive lock on `path`, waiting up to `wait_s` for a holder to go; the fd.

    The fd is left open (and inheritable, so it survives exec): the lock lasts as long as the
    process. Raises Busy when the wait ran out, OSError when the lock file cannot be made.

    The folder is its owner's alone (0700) and the file 0600: flock needs no write access, so a
    lock anybody could open is a lock any workload could take first and stall a runner with."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if os.stat(folder).st_mode & 0o077 and os.stat(folder).st_uid == os.geteuid():
        os.chmod(folder, 0o700)  # made open by an earlier version
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    deadline = time.monotonic() + max(0.0, wait_s)
    delay, said = 0.1, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
        holder = _holder_text(fd)
        if time.monotonic() >= deadline:
            os.close(fd)
            raise Busy(f"{name} is still running as {holder} (it holds {path}) after waiting {wait_s:.0f}s: "
                       "not starting a second one; fix: `appliance down` stops what an earlier supervisord "
                       "left running, then `appliance up`")
        if not said and say is not None:
            say(f"{name} is already running as {holder} (it holds {path}; left by a supervisord that "
                f"died?): waiting up to {wait_s:.0f}s for it to stop")
            said = True
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 2.0)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.set_inheritable(fd, inheritable)
    return fd


def holders(path: str) -> list[int]:
    """Every process that has `path` open (the lock holder and anything that inherited it), sorted."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    real = os.path.realpath(path)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != real:
                    continue
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                found.append(int(entry))
                break
    return sorted(found)


def is_held(path: str) -> bool:
    """True while some process holds the lock on `path` (probes without keeping it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def log_to(path: str) -> None:
    """Make `path` this process's stdout and stderr (appending; rotated once over LOG_MAX)."""
    try:
        if os.path.getsize(path) > LOG_MAX:
            os.replace(path, path + ".1")
    except OSError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def parse_args(argv: list[str]) -> tuple[str, str, float, str | None, list[str]]:
    values: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i] != "--":
        name, eq, value = argv[i].partition("=")
        if name not in ("--lock", "--name", "--wait", "--log"):
            raise ValueError(f"unknown argument {argv[i]!r}; {USAGE}")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"{name} needs a value; {USAGE}")
            i += 1
            value = argv[i]
        values[name] = value
        i += 1
    command = argv[i + 1:]
    if not command or "--lock" not in values or "--name" not in values:
        raise ValueError(f"--lock, --name and a command after '--' are needed; {USAGE}")
    try:
        wait_s = float(values.get("--wait", DEFAULT_WAIT_S))
    except ValueError:
        raise ValueError(f"--wait must be a number of seconds, not {values['--wait']!r}") from None
    return values["--lock"], values["--name"], wait_s, values.get("--log"), command


def main(argv: list[str] | None = None) -> int:
    def say(text: str) -> None:
        print(f"appliance.singleton: {text}", file=sys.stderr, flush=True)

    try:
        path, name, wait_s, log, command = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        say(str(err))
        return 2
    if log:
        try:
            log_to(log)
        except OSError as err:
            say(f"cannot write the log {log}: {err.strerror or err}")
            return 2
    try:
        hold(path, name, wait_s, say)
    except Busy as err:
        say(str(err))
        return EXIT_BUSY
    except OSError as err:
        say(f"cannot take the lock {path}: {err.strerror or err}; fix: check that {os.path.dirname(path)} "
            "is writable by this user")
        return 2
    try:
        os.execvp(command[0], command)
    except OSError as err:
        say(f"cannot run {command[0]!r}: {err.strerror}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
