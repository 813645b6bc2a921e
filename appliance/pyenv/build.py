"""Building one venv: in a fresh directory, by uv from the shared cache or by pip as the
workload's user, sealed and then published under its key.

- Built once: the builder holds an exclusive fcntl lock on `LOCKS/<key>.lock` (see venvs.py)
  and builds into `VENVS/.<key>.<random>/`; when it is complete (`.complete` written last) the
  symlink `VENVS/<key>` is renamed into place, so nobody ever sees half a venv. The venv
  keeps its real directory for life: a venv cannot be moved (its scripts' `#!` lines
  name it), a symlink can. A build that died half way leaves a `.<key>.*` directory that
  eviction removes.
- Private while it builds: VENVS is root's and 0711 (workloads reach a venv by its key but
  cannot list the folder), and the build directory is made fresh by mkdtemp (0700, a random
  name, so nobody can guess it or make it first), owned by its builder, and opened to
  readers (0755) only once sealed. With one account for every slot (`isolation.user`), the
  other slots' workloads are the same uid as a pip build: they cannot find its directory by
  listing, but that account's processes can still see each other (ps): per-slot accounts,
  the default, are the boundary.
- uv reads only the admin's settings: `UV_*` in the runner's environment and
  /etc/uv/uv.toml (`--no-config`, plus `--config-file` for that file), never a uv.toml or
  pyproject.toml in a folder above the build, where a workload might have written one.
- A set uv rejects (its resolver's "No solution found", which includes a package that has
  only a source distribution) is built by the pip path below, with uv's reason in the job's
  log. Any other uv failure (index unreachable, disk full) fails the build: pip would fail
  the same way, only slower.
- The pip path (`installer="pip"`, or the fallback) builds as the workload's user
  (`build_as`), not root, because building from source runs the package's setup.py: the
  build directory is handed to that user and venv/pip run as it, with HOME and TMPDIR
  inside the build directory and pip's cache off (PIP_NO_CACHE_DIR): a cache shared between
  builds of different requests would let one request plant wheels that another request's
  venv then installs. Before the venv is published the runner makes the whole tree its own
  (root) with no group or other write bits, so no workload can change a venv (e.g. plant a
  sitecustomize.py) that other jobs use. The admin's pip configuration still applies (PIP_*
  in the runner's environment, PIP_CONFIG_FILE if set there, /etc/pip.conf; not root's
  ~/.config/pip, since HOME is the build's own).
- A uv-built venv is byte-compiled before it is sealed, by the build user, never by root
  (bytecode.py): an interpreter started in the venv runs the set's `.pth` lines.
- A failed uv or pip run is returned as text for the `output` artifact (the experiment fails
  with ENV_FAILED), with a one-line `summary` (the installer's error, naming the requirement)
  for the job's reason; never raised into the runner.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Optional

from appliance.pyenv import bytecode
from appliance.pyenv.progress import Progress, _LogTail
from appliance.pyenv.uvcache import UvCache
from appliance.process import Supervision, signal_group, supervise


class EnvBuildFailed(Exception):
    """uv, pip or venv failed; str(self) is the text for the experiment's output, `summary`
    the installer's error in one line (it names the requirement) for the job's reason."""

    def __init__(self, text: str, summary: str = ""):
        super().__init__(text)
        self.summary = summary or _summary(text)


class _UvRejected(Exception):
    """uv's resolver refused the set: the pip path may still build it."""


class Interrupted(Exception):
    """The build, or the wait for someone else's, was stopped (drain or lifetime)."""


@dataclass(frozen=True)
class BuildUser:
    """Who venv and pip run as. `preexec` runs in the child as root before it drops to
    uid/gid (e.g. to join the job cgroup); subprocess's own `user=` would drop first."""

    uid: int
    gid: int
    preexec: Optional[Callable[[], None]] = None


def _as_user(user: BuildUser) -> Callable[[], None]:
    def child() -> None:
        if user.preexec is not None:
            user.preexec()
        os.setgroups([])
        os.setgid(user.gid)
        os.setuid(user.uid)
        os.umask(0o022)

    return child


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def seal(top: Path, build_uid: Optional[int] = None) -> None:
    """Make the tree under `top` ours (root's) with no group/other write, setuid or setgid
    bits. Top-down, and a directory is sealed before it is listed: a process the build left
    behind can then no longer swap an entry (for a symlink, say) between our lstat and
    chmod. A hard link to a file the build user does not own (a system file it cannot
    write) fails the build rather than having its owner and mode changed."""
    owner, group = os.geteuid(), os.getegid()

    def fix(path: str) -> None:
        st = os.lstat(path)
        os.lchown(path, owner, group)
        if stat.S_ISLNK(st.st_mode):
            return
        if (build_uid is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1
                and st.st_uid != build_uid):
            raise EnvBuildFailed(f"appliance: the environment build left {path}, a hard link to "
                                 f"a file it does not own; the environment is not used")
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o755)

    fix(str(top))
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            fix(os.path.join(dirpath, name))


def _summary(text: str) -> str:
    """The installer's error in one line: uv's `error:`/`cause:` lines, pip's `ERROR:` ones."""
    lines = [t.strip() for t in text.splitlines() if not t.startswith(("DEBUG ", "TRACE "))]
    picked = [t for t in lines if t.startswith(("error:", "cause:", "ERROR:", "hint:"))]
    return " ".join(picked or lines[-3:])[:600]


def venvs_folder(root: Path) -> None:
    """`root` made, and (as root) ours with mode 0711: workloads reach a venv by its key,
    but cannot list the folder, so a build in progress has a name no workload can learn."""
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode):
            raise EnvBuildFailed(f"appliance: {root} is not a folder")
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o711:
            os.chown(root, 0, 0)
            os.chmod(root, 0o711)


def venv_path(root: Path, key: str) -> Path:
    """Where the venv for `key` is used from (a symlink to its build directory)."""
    return root / key


def remove(root: Path, key: str) -> None:
    """Unpublish and delete `key`'s venv (hold its exclusive lock)."""
    link = venv_path(root, key)
    if link.is_symlink():
        target = root / os.path.basename(os.readlink(link))
        link.unlink()
        shutil.rmtree(target, ignore_errors=True)
    elif link.exists():
        shutil.rmtree(link, ignore_errors=True)


def build(root: Path, key: str, requirements: list[str], python: str, sv: Supervision,
          build_as: Optional[BuildUser], progress: Progress, env: dict, uvc: Optional[UvCache]) -> None:
    """Build `key`'s venv and publish it (hold the exclusive lock): by uv when there is a
    uv cache, by pip when there is none or uv rejects the set. `env` is the environment for
    venv/pip/uv."""
    if uvc is not None and uvc.uv:
        try:
            installed = _in_fresh_dir(
                root, key, requirements, sv, progress, lambda build, log, watched: _uv_install(
                    build, log, requirements, python, watched, build_as, uvc, dict(env)), None)
        except _UvRejected as e:
            progress.line(f"uv cannot install this set ({e}); building it with pip instead, "
                          f"as the workload's user")
        else:
            uvc.used(installed)
            try:
                uvc.evict(keep=installed, env=dict(env))
            except (OSError, subprocess.SubprocessError):
                pass  # trimmed after a later build
            return
    elif uvc is not None:
        progress.line("uv is not installed (pip install uv): building with pip")
    _in_fresh_dir(root, key, requirements, sv, progress, lambda build, log, watched: _pip_install(
        build, log, requirements, python, watched, build_as, dict(env)), build_as)


def _in_fresh_dir(root: Path, key: str, requirements: list[str], sv: Supervision, progress: Progress,
                  install: Callable[[Path, IO, Supervision], object], build_as: Optional[BuildUser]):
    """Run `install(build_dir, log, sv)` in a fresh `.<key>.*` directory (its log followed
    for `progress` at every tick of `sv`), then seal and publish it as `key`; install's
    answer is returned. A failure leaves nothing behind."""
    venvs_folder(root)
    build = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))  # 0700, ours, a name nobody knew
    try:
        (build / "requirements.txt").write_text("".join(r + "\n" for r in requirements))
        # the log is opened before the build user owns the directory: we write and read
        # our own file, whatever the build does to the name
        with open(build / ".build.log", "wb+") as log:
            tail = _LogTail(build / ".build.log", progress)
            tick = sv.tick
            try:
                answer = install(build, log, dataclasses.replace(sv, tick=lambda: (tail.poll(), tick())))
            finally:
                tail.close()
        seal(build, build_as.uid if build_as is not None else None)
        os.chmod(build, 0o755)  # sealed: now anyone may read it
        (build / ".size").write_text(str(_dir_bytes(build)))
        (build / ".complete").write_text(f"{time.time()}\n")
        remove(root, key)  # a venv of the old layout that died half way
        link = root / f".{key}.link"
        link.unlink(missing_ok=True)
        os.symlink(build.name, link)
        os.replace(link, venv_path(root, key))
        return answer
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def _uv_install(build: Path, log: IO, requirements: list[str], python: str, sv: Supervision,
                build_as: Optional[BuildUser], uvc: UvCache, env: dict) -> list[str]:
    """uv venv + uv pip install --no-build as root (in the job's cgroup), from the shared
    cache; the names installed. Raises _UvRejected for a set uv's resolver refuses."""
    # root (the cache is root's), in the job's cgroup; as itself outside a slot
    as_root = BuildUser(0, 0, build_as.preexec) if build_as is not None else None
    env.pop("VIRTUAL_ENV", None)
    for pip_name, uv_name in (("PIP_INDEX_URL", "UV_INDEX_URL"), ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL")):
        if env.get(pip_name) and uv_name not in env and "UV_DEFAULT_INDEX" not in env:
            env[uv_name] = env[pip_name]  # the admin's pip index, unless uv has its own
    if env.get("PIP_CERT") and "SSL_CERT_FILE" not in env:
        env["SSL_CERT_FILE"] = env["PIP_CERT"]  # the admin's CA bundle for pip is uv's too
    if not ({"SSL_CERT_FILE", "UV_NATIVE_TLS", "UV_SYSTEM_CERTS"} & env.keys()):
        # uv trusts only its own built-in roots unless told; pip and curl trust the system
        # store, where a lab's own CA (or its TLS proxy's) is installed: so does uv here
        env["UV_NATIVE_TLS"] = "1"
    uvc.ensure()  # root's and 0700, even if someone removed it
    mode = uvc.link_mode()
    config = uvc.config_args(env)
    steps = [[uvc.uv, "venv", *config, "--quiet", "--allow-existing", "--no-python-downloads",
              "--python", python, str(build)]]
    if requirements:
        steps.append([uvc.uv, "pip", "install", *config, "--verbose", "--python", str(build / "bin" / "python"),
                      "--cache-dir", str(uvc.root), "--link-mode", mode, "--no-build",
                      "--no-python-downloads", "--", *requirements])
    hold = uvc.lock(fcntl.LOCK_SH)
    try:
        for argv in steps:
            _run(argv, log, env, build, sv, as_root)
    except EnvBuildFailed as e:
        if "No solution found" in e.summary:
            raise _UvRejected(e.summary) from None
        raise
    finally:
        hold.close()
    log.seek(0)
    installed = re.findall(r"^ \+ ([A-Za-z0-9._-]+)==", log.read().decode(errors="replace"), re.M)
    log.seek(0, os.SEEK_END)
    if requirements:
        bytecode.compile_venv(build, build_as.uid if build_as else None, build_as.gid if build_as else None,
                              lambda argv, cwd: _compile(argv, log, env, cwd, sv, build_as))
    return installed


def _compile(argv: list[str], log: IO, env: dict, cwd: Path, sv: Supervision,
             build_as: Optional[BuildUser]) -> None:
    """Run the byte-compiler as the build user; a failure (a file that does not compile) is
    noted in the log and leaves the rest to compile in memory."""
    try:
        _run(argv, log, env, cwd, sv, build_as)
    except EnvBuildFailed as e:
        log.write(f"appliance: byte-compiling stopped ({e.summary[:200]}); what did not compile "
                  f"compiles in memory when imported\n".encode())


def _pip_install(build: Path, log: IO, requirements: list[str], python: str, sv: Supervision,
                 build_as: Optional[BuildUser], env: dict) -> None:
    cwd = build
    if build_as is not None:
        cwd = build / ".home"
        cwd.mkdir()
        env.update(HOME=str(cwd), TMPDIR=str(cwd), PIP_NO_CACHE_DIR="1")
        os.chown(cwd, build_as.uid, build_as.gid)
        os.chown(build, build_as.uid, build_as.gid)
    steps = [[python, "-m", "venv", str(build)]]
    if requirements:
        steps.append([str(build / "bin" / "python"), "-m", "pip", "install",
                      "--disable-pip-version-check", "--no-input", "--", *requirements])
    for argv in steps:
        _run(argv, log, env, cwd, sv, build_as)
    if build_as is not None:
        shutil.rmtree(cwd)


def _run(argv: list[str], log: IO, env: dict, cwd: Path, sv: Supervision,
         build_as: Optional[BuildUser]) -> None:
    log.write(("$ " + " ".join(argv) + "\n").encode())
    log.flush()
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=str(cwd),
                                start_new_session=True,
                                preexec_fn=_as_user(build_as) if build_as else None)
    except (OSError, subprocess.SubprocessError) as e:
        raise EnvBuildFailed(f"appliance: building the Python environment failed: cannot "
                             f"start {argv[0]}: {e}\n") from e
    try:
        rc, stopped = supervise(proc, sv)
    except BaseException:
        signal_group(proc.pid, 9)
        raise
    if stopped:
        raise Interrupted(f"environment build {stopped}")
    if rc != 0:
        log.seek(0)
        text = "".join(t for t in log.read().decode(errors="replace").splitlines(keepends=True)
                       if not t.startswith(("DEBUG ", "TRACE ")))  # uv --verbose
        raise EnvBuildFailed(
            f"appliance: building the Python environment failed (exit {rc}):\n{text}")
