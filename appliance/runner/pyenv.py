"""The experiment's Python environment: a cache of virtualenvs keyed by requirement set.

The requirement set is the request's `pythonenv` (the client's whole `pip freeze`) without
`studioml` itself and without lines that only mean something on the client's machine
(editable installs, `pkg @ file://...`), plus `config.pip`. Its key is a hash of the sorted,
de-duplicated set and the interpreter's version, so the same set always maps to the same
venv at `VENVS/<key>/`.

- Built once: the builder holds an exclusive fcntl lock on `VENVS/<key>.lock`; a second
  runner wanting the same set waits on the lock, then finds the `.complete` marker and reuses
  the venv. A build that died half way (no marker) is wiped and redone.
- In use: a runner holds a shared lock on `<key>.lock` while its job runs, so eviction (which
  needs the exclusive lock, non-blocking) never removes a venv under a running job.
- Evicted least recently used (`.last_used` mtime) when there are more than `max_count`
  venvs or they take more than `max_bytes`.
- No `--system-site-packages`: the experiment gets exactly what its client had, not the
  appliance's own packages (boto3, supervisor, ...) in whatever versions the appliance uses;
  the price is that big frameworks are installed once per distinct requirement set (pip's
  wheel cache makes the second install of a wheel cheap).
- A failed pip run is returned as text for the `output` artifact (the experiment fails with
  ENV_FAILED), never raised into the runner.

With `python` set in the config (`RunnerSettings.python`), no venv is built: workloads run in
that interpreter as it is and `pythonenv`/`config.pip` are ignored.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Optional

from appliance.runner.execute import Supervision, signal_group, supervise

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _dist_name(req: str) -> str:
    m = _NAME.match(req)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else ""


def requirement_set(pythonenv: Iterable[str], pip: Iterable[str] = ()) -> list[str]:
    """The sorted requirement lines a venv is built from."""
    out = set()
    for line in list(pythonenv or []) + list(pip or []):
        line = str(line).strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-e ", "--editable")) or "@ file:" in line:
            continue  # a path on the client's machine
        if _dist_name(line) == "studioml":
            continue
        out.add(line)
    return sorted(out)


def interpreter_for(pythonver: Optional[str], usable: Callable[[str], bool] = lambda path: True) -> str:
    """An interpreter for the requested `pythonver` ("3.11"): `python3.11` on PATH (or Debian's
    /usr/bin/python3.11), else the one the runner runs on (base interpreter, not the
    appliance's venv). `usable(path)` says whether the workload's user may run it (a pyenv
    interpreter under /root is no use to an unprivileged account); the first usable one wins."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    candidates = []
    if pythonver:
        ver = str(pythonver).strip()
        if re.fullmatch(r"\d+(\.\d+)?", ver):
            candidates += [shutil.which(f"python{ver}"), f"/usr/bin/python{ver}"]
    candidates += [base, shutil.which("python3"), "/usr/bin/python3"]
    for c in candidates:
        if c and os.access(c, os.X_OK) and usable(c):
            return c
    return base


_versions: dict = {}


def python_version(python: str) -> str:
    """"3.11.7" for an interpreter path (asked once per runner process)."""
    if python not in _versions:
        _versions[python] = _ask_version(python)
    return _versions[python]


def _ask_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or python


def env_key(requirements: list[str], version: str) -> str:
    h = hashlib.sha256()
    h.update(f"python {version}\n".encode())
    for r in requirements:
        h.update(r.encode() + b"\n")
    return h.hexdigest()[:24]


@dataclass
class PythonEnv:
    python: str  # interpreter to run the workload with
    bin_dir: Optional[Path]  # the venv's bin/ to put first on PATH, if any
    key: Optional[str]
    reused: bool
    _lock: Optional[IO] = None

    def env_vars(self) -> dict[str, str]:
        if self.bin_dir is None:
            return {}
        return {"VIRTUAL_ENV": str(self.bin_dir.parent)}

    def release(self) -> None:
        """The job is over: the venv may be evicted again."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class EnvBuildFailed(Exception):
    """pip (or venv) failed; str(self) is the text for the experiment's output."""


class Interrupted(Exception):
    """The build was stopped (drain or lifetime)."""


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class VenvCache:
    def __init__(self, root: Path, max_bytes: int = 20 << 30, max_count: int = 20,
                 build_env: Optional[dict] = None):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.build_env = build_env  # environment for venv/pip (None: the runner's, cleaned)

    def path(self, key: str) -> Path:
        return self.root / key

    def _lock_file(self, key: str) -> IO:
        self.root.mkdir(parents=True, exist_ok=True)
        return open(self.root / f"{key}.lock", "a")

    def prepare(self, requirements: list[str], python: str,
                sv: Optional[Supervision] = None) -> PythonEnv:
        """A venv for `requirements`, built if needed; raises EnvBuildFailed/Interrupted."""
        version = python_version(python)
        key = env_key(requirements, version)
        venv = self.path(key)
        lock = self._lock_file(key)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            reused = (venv / ".complete").exists()
            if not reused:
                self._build(venv, requirements, python, sv or Supervision())
            # downgrade: others may use it too, eviction may not take it
            fcntl.flock(lock, fcntl.LOCK_SH)
            if not (venv / ".complete").exists():  # evicted in the gap
                lock.close()
                return self.prepare(requirements, python, sv)
            (venv / ".last_used").touch()
        except BaseException:
            lock.close()
            raise
        self.evict(keep=key)
        return PythonEnv(python=str(venv / "bin" / "python"), bin_dir=venv / "bin", key=key,
                         reused=reused, _lock=lock)

    def _build(self, venv: Path, requirements: list[str], python: str,
               sv: Supervision) -> None:
        if venv.exists():
            shutil.rmtree(venv)  # a build that died half way
        venv.mkdir(parents=True)
        log = venv / ".build.log"
        (venv / "requirements.txt").write_text("".join(r + "\n" for r in requirements))
        steps = [[python, "-m", "venv", str(venv)]]
        if requirements:
            steps.append([str(venv / "bin" / "python"), "-m", "pip", "install",
                          "--disable-pip-version-check", "--no-input",
                          "-r", str(venv / "requirements.txt")])
        env = self.build_env
        if env is None:
            from appliance.runner.execute import base_env
            env = base_env(os.environ)
        for argv in steps:
            with open(log, "ab") as out:
                out.write(("$ " + " ".join(argv) + "\n").encode())
                out.flush()
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
                try:
                    rc, stopped = supervise(proc, sv)
                except BaseException:
                    signal_group(proc.pid, 9)
                    raise
            if stopped:
                shutil.rmtree(venv, ignore_errors=True)
                raise Interrupted(f"environment build {stopped}")
            if rc != 0:
                text = log.read_text(errors="replace")
                shutil.rmtree(venv, ignore_errors=True)
                raise EnvBuildFailed(
                    f"appliance: building the Python environment failed (exit {rc}):\n{text}")
        (venv / ".size").write_text(str(_dir_bytes(venv)))
        (venv / ".complete").write_text(f"{time.time()}\n")

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, key) of complete venvs, least recently used first."""
        out = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            if not (d / ".complete").exists():
                continue
            try:
                used = (d / ".last_used").stat().st_mtime
            except FileNotFoundError:
                used = 0.0
            try:
                size = int((d / ".size").read_text())
            except (OSError, ValueError):
                size = 0
            out.append((used, size, d.name))
        out.sort()
        return out

    def evict(self, keep: Optional[str] = None) -> list[str]:
        """Remove least recently used venvs nobody uses until the cache fits its bounds."""
        entries = self.entries()
        count = len(entries)
        total = sum(s for _, s, _ in entries)
        removed = []
        for _, size, key in entries:
            if count <= self.max_count and total <= self.max_bytes:
                break
            if key == keep:
                continue
            lock = self._lock_file(key)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue  # in use or being built
            try:
                (self.path(key) / ".complete").unlink(missing_ok=True)
                shutil.rmtree(self.path(key), ignore_errors=True)
                removed.append(key)
                count -= 1
                total -= size
            finally:
                lock.close()
        return removed


def system_env(python: str) -> PythonEnv:
    """The configured interpreter, used as it is."""
    return PythonEnv(python=python, bin_dir=None, key=None, reused=True)
