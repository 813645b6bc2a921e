"""The experiment's Python environment: a cache of virtualenvs keyed by requirement set.

The requirement set is the request's `pythonenv` (the client's whole `pip freeze`) without
`studioml` itself, plus `config.pip`. Only requirement specifiers are accepted (PEP 508, as
`packaging` parses them: name, extras, versions, markers): a pip option (`-r /etc/shadow`,
`--index-url`), a direct reference (`name @ URL`) or a local path is refused (BadRequirement),
since pip would read files or run code from wherever the request points. Two kinds of lines
`pip freeze` writes for installs that only exist on the client's machine (`-e ...` and
`name @ file://...`) are skipped and returned, so the job output can say so. pip gets the
normalized specifiers (`str(Requirement(line))`, never the raw line) as arguments, not as a
requirements file, whose own syntax (`${VAR}`, `#`, options after a requirement) would be
one more language to police. The key is a hash of the sorted, de-duplicated set and the
interpreter's version, so the same set always maps to the same venv at `VENVS/<key>`.

- Built once: the builder holds an exclusive fcntl lock on `VENVS/<key>.lock` and builds
  into `VENVS/.<key>.<random>/`; when it is complete (`.complete` written last) the
  symlink `VENVS/<key>` is renamed into place, so nobody ever sees half a venv. The venv
  keeps its real directory for life: a venv cannot be moved (its scripts' `#!` lines
  name it), a symlink can. A build that died half way leaves a `.<key>.*` directory that
  eviction removes.
- In use: a runner holds a shared lock on `<key>.lock` while its job runs, so any number of
  jobs use one venv at once, and eviction (which needs the exclusive lock, non-blocking)
  never removes a venv under a running job. Nobody blocks in flock: a runner waiting for
  someone else's build polls with LOCK_NB, keeps its job's keepalives going and gives up
  at a drain or the job's lifetime (Interrupted).
- Installed by uv (`installer="uv"`, the default) from one shared uv cache (`UvCache`,
  HOME/cache/uv), linked into the venv (`clone` where the filesystem copies on write, else
  `hardlink`: cache and venvs must share a filesystem, `appliance doctor` checks). The cache's
  safety rule: **only root writes the uv cache, and uv runs there only with `--no-build`**, so
  no package code runs while it is written (a wheel is unpacked, never executed; the
  requirement set is plain specifiers, so uv fetches from the admin's index only). The cache
  is 0700 root; a workload reaches its files only through a sealed venv, where a hard link is
  the same root-owned, read-only inode (sealing chowns to root and drops group/other write,
  which the cached inode already is, so the cache stays as uv left it). uv locks its cache
  for concurrent builds; our own lock (`uv.lock` beside it: builds shared, eviction
  exclusive) keeps eviction away from a running build.
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
- While a build runs, `Progress` gets what is being resolved and downloaded (for the job's
  log) and "building env (n/m)" (for the runner's status); uv's whole verbose log stays in
  the build's `.build.log`.
- A uv-built venv has no bytecode: it is compiled after the venv is published, by a
  background `compileall` as root (atomic writes; a workload that starts first compiles in
  memory), so a new set is ready in seconds and later jobs import fast.
- Evicted least recently used (`.last_used` mtime) when there are more than `max_count`
  venvs or they take more than `max_bytes`.
- No `--system-site-packages`: the experiment gets exactly what its client had, not the
  appliance's own packages (boto3, supervisor, ...) in whatever versions the appliance uses;
  the price is that big frameworks are installed once per distinct requirement set.
- A failed uv or pip run is returned as text for the `output` artifact (the experiment fails
  with ENV_FAILED), with a one-line `summary` (the installer's error, naming the requirement)
  for the job's reason; never raised into the runner.

With `python` set in the config (`RunnerSettings.python`), no venv is built: workloads run in
that interpreter as it is and `pythonenv`/`config.pip` are ignored.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Optional

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from appliance.runner.execute import (INTERRUPTED, TIMED_OUT, Supervision, base_env, signal_group,
                                      supervise)

# what pip takes for a local archive even when it parses as a name ("evil.tar.gz")
_ARCHIVES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz",
             ".tlz", ".tar.lz", ".tar.lzma")
_EDITABLE = re.compile(r"(-e|--editable)(\s|=)")


class BadRequirement(ValueError):
    """A requirement line that is not a plain requirement specifier."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems) + ": only requirement specifiers like 'numpy==1.26.4' "
                         "are accepted (no pip options, URLs or local paths)")


def _problem(line: str) -> tuple[Optional[Requirement], str]:
    """(the parsed requirement, "") or (None, what is wrong with it)."""
    if line.startswith("-"):
        return None, "is a pip option"
    try:
        req = Requirement(line)
    except InvalidRequirement:
        return None, "is not a requirement specifier"
    if req.url:
        return None, "is a direct reference to a URL or file"
    if req.name.lower().endswith(_ARCHIVES):
        return None, "names an archive, which pip would read as a local path"
    return req, ""


def normalized(lines: Iterable[str]) -> list[str]:
    """Sorted, de-duplicated `str(Requirement(line))`; BadRequirement names every bad line."""
    out, bad = set(), []
    for line in lines:
        req, why = _problem(str(line).strip())
        if req is None:
            bad.append(f"requirement {str(line).strip()!r} {why}")
        else:
            out.add(str(req))
    if bad:
        raise BadRequirement(bad)
    return sorted(out)


@dataclass
class RequirementSet:
    lines: list[str]  # normalized requirement specifiers to install, sorted
    skipped: list[str] = field(default_factory=list)  # client-local installs, not installed

    def __iter__(self) -> Iterator[str]:
        return iter(self.lines)


def _client_local(line: str) -> bool:
    """A line `pip freeze` writes for an install from the client's own disk."""
    if _EDITABLE.match(line):
        return True
    try:
        url = Requirement(line).url
    except InvalidRequirement:
        return False
    return bool(url) and url.startswith("file:")


def requirement_set(pythonenv: Iterable[str], pip: Iterable[str] = ()) -> RequirementSet:
    """What a venv is built from; raises BadRequirement naming every line that is refused."""
    lines, skipped, bad = set(), [], []
    for where, given in (("pythonenv", pythonenv), ("config.pip", pip)):
        for raw in given or ():
            line = str(raw).strip()
            if not line or line.startswith("#"):
                continue
            if _client_local(line):
                skipped.append(line)
                continue
            req, why = _problem(line)
            if req is None:
                bad.append(f"{where} line {line!r} {why}")
            elif canonicalize_name(req.name) != "studioml":
                lines.add(str(req))
    if bad:
        raise BadRequirement(bad)
    return RequirementSet(sorted(lines), skipped)


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


@dataclass
class Progress:
    """Where a build reports: `line` gets what is resolved and downloaded (for the job's log),
    `step` "building env (n/m)" (for the runner's status)."""

    line: Callable[[str], None] = lambda text: None
    step: Callable[[str], None] = lambda text: None


_SELECTING = re.compile(r"^DEBUG Selecting: (\S+)")
_RESOLVED = re.compile(r"^Resolved (\d+) packages?")
_UNCACHED = re.compile(r"^DEBUG Identified uncached distribution: (\S+)")
_FETCHING = re.compile(r"^DEBUG Sending fresh GET request for: (\S+)")


class _LogTail:
    """Follows a build's log as it grows and tells `Progress` what matters in it: uv's
    selections, downloads and summary lines (not its DEBUG chatter), pip's own lines."""

    def __init__(self, path: Path, progress: Progress):
        self.f = open(path, "rb")
        self.progress = progress
        self.rest = b""
        self.total = 0  # packages resolved
        self.done = 0  # cached, or their download started
        self.selected = 0

    def poll(self) -> None:
        data = self.rest + self.f.read()
        *lines, self.rest = data.split(b"\n")
        for raw in lines:
            try:
                self._one(raw.decode(errors="replace").rstrip())
            except Exception:  # a reporting hiccup never fails a build
                pass

    def close(self) -> None:
        self.poll()
        self.f.close()

    def _step(self) -> None:
        if self.total:
            self.progress.step(f"building env ({min(self.done, self.total)}/{self.total})")
        else:
            self.progress.step(f"building env (resolving, {self.selected} selected)")

    def _one(self, text: str) -> None:
        if not text:
            return
        m = _SELECTING.match(text)
        if m:
            self.selected += 1
            self.progress.line(f"resolving: {m.group(1)}")
            return self._step()
        m = _RESOLVED.match(text)
        if m:
            self.total = self.done = int(m.group(1))
            self.progress.line(text)
            return None
        m = _UNCACHED.match(text)
        if m:
            self.done -= 1
            return None
        m = _FETCHING.match(text)
        if m:
            if "/simple/" not in m.group(1):
                self.done += 1
                self.progress.line(f"downloading {m.group(1).rsplit('/', 1)[-1]}")
                self._step()
            return
        if text.startswith(("DEBUG ", "TRACE ", "WARN ", "$ ", "Using Python ")):
            return
        if text.startswith("Collecting "):  # pip
            self.selected += 1
            self._step()
        if text.startswith(("Installed ", "Successfully installed")):
            self.done = self.total
            self._step()
        self.progress.line(text)


def _summary(text: str) -> str:
    """The installer's error in one line: uv's `error:`/`cause:` lines, pip's `ERROR:` ones."""
    lines = [t.strip() for t in text.splitlines() if not t.startswith(("DEBUG ", "TRACE "))]
    picked = [t for t in lines if t.startswith(("error:", "cause:", "ERROR:", "hint:"))]
    return " ".join(picked or lines[-3:])[:600]


def uv_binary() -> Optional[str]:
    """The uv executable the `uv` wheel ships, or None."""
    try:
        import uv
        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        return None


_FICLONE = 0x40049409


def reflinks(folder: Path) -> bool:
    """Whether files in `folder` can be cloned (copy on write, e.g. btrfs, XFS)."""
    try:
        with tempfile.TemporaryFile(dir=folder) as a, tempfile.TemporaryFile(dir=folder) as b:
            a.write(b"x")
            a.flush()
            fcntl.ioctl(b.fileno(), _FICLONE, a.fileno())
        return True
    except OSError:
        return False


def _disk_bytes(path: Path) -> int:
    """Bytes `path` takes on disk, each inode once (hard links)."""
    seen, total = set(), 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


class UvCache:
    """The one uv cache every build shares (see the module docstring for its safety rule).

    Bounded to `max_bytes`: after a build, the packages used least recently (a marker file per
    package in `<root>.used/`, its mtime the last use) are removed with `uv cache clean <name>`
    until the cache fits, never one the build just used. Eviction takes `<root>.lock`
    exclusively (non-blocking: a busy cache is trimmed after a later build); builds hold it
    shared."""

    def __init__(self, root: Path, max_bytes: int = 20 << 30, uv: Optional[str] = None):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.uv = uv or uv_binary()
        self.used_dir = self.root.with_name(self.root.name + ".used")
        self._mode: Optional[str] = None

    def ensure(self) -> None:
        for d in (self.root, self.used_dir):
            d.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(d, 0, 0)
                os.chmod(d, 0o700)

    def link_mode(self) -> str:
        if self._mode is None:
            self.ensure()
            self._mode = "clone" if reflinks(self.root) else "hardlink"
        return self._mode

    def lock(self, how: int, block: bool = True) -> Optional[IO]:
        f = open(self.root.with_name(self.root.name + ".lock"), "a")
        try:
            fcntl.flock(f, how | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return None
        return f

    def used(self, names: Iterable[str]) -> None:
        now = time.time()
        for name in names:
            marker = self.used_dir / canonicalize_name(name)
            marker.touch()
            os.utime(marker, (now, now))

    def size(self) -> int:
        return _disk_bytes(self.root)

    def evict(self, keep: Iterable[str] = (), env: Optional[dict] = None) -> list[str]:
        """Remove least recently used packages until the cache fits; the names removed."""
        if self.size() <= self.max_bytes:
            return []
        lock = self.lock(fcntl.LOCK_EX, block=False)
        if lock is None:
            return []
        keep = {canonicalize_name(k) for k in keep}
        removed = []
        with lock:
            markers = sorted(self.used_dir.iterdir(), key=lambda p: p.stat().st_mtime)
            for marker in markers:
                if marker.name in keep:
                    continue
                subprocess.run([self.uv, "cache", "clean", "--cache-dir", str(self.root), "--", marker.name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, timeout=600)
                marker.unlink(missing_ok=True)
                removed.append(marker.name)
                if self.size() <= self.max_bytes:
                    break
        return removed


def _try_lock(f: IO, how: int) -> bool:
    try:
        fcntl.flock(f, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class VenvCache:
    def __init__(self, root: Path, max_bytes: int = 20 << 30, max_count: int = 20,
                 build_env: Optional[dict] = None, uv_cache: Optional[UvCache] = None):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.build_env = build_env  # environment for venv/pip (None: the runner's, cleaned)
        self.stats = {"hits": 0, "misses": 0, "build_failures": 0, "build_seconds": 0.0}  # for /metrics
        self.uv_cache = uv_cache  # None: every set is built by pip, as before
        self._compiling: list = []  # background compileall processes (reaped as they end)

    def path(self, key: str) -> Path:
        """Where the venv for `key` is used from (a symlink to its build directory)."""
        return self.root / key

    def _lock_file(self, key: str) -> IO:
        self.root.mkdir(parents=True, exist_ok=True)
        return open(self.root / f"{key}.lock", "a")

    def _complete(self, key: str) -> bool:
        return (self.path(key) / ".complete").exists()

    def prepare(self, requirements: Iterable[str], python: str, sv: Optional[Supervision] = None,
                build_as: Optional[BuildUser] = None, progress: Optional[Progress] = None) -> PythonEnv:
        """A venv for `requirements`, built (see the module docstring for who runs what) when
        nobody has; held shared until PythonEnv.release(). Raises BadRequirement,
        EnvBuildFailed, Interrupted."""
        sv = sv or Supervision()
        progress = progress or Progress()
        reqs = normalized(requirements)
        key = env_key(reqs, python_version(python))
        venv = self.path(key)
        lock = self._lock_file(key)
        built = False
        try:
            next_tick = time.time() + sv.tick_s
            while True:
                if _try_lock(lock, fcntl.LOCK_SH):
                    if self._complete(key):
                        break
                    fcntl.flock(lock, fcntl.LOCK_UN)
                if _try_lock(lock, fcntl.LOCK_EX):
                    if not self._complete(key):
                        self.stats["misses"] += 1
                        began = time.monotonic()
                        try:
                            self._build(key, reqs, python, sv, build_as, progress)
                        except BaseException:
                            self.stats["build_failures"] += 1
                            raise
                        finally:
                            self.stats["build_seconds"] += time.monotonic() - began
                        built = True
                    fcntl.flock(lock, fcntl.LOCK_UN)
                    continue  # and take the shared hold like everyone else
                # someone else is building it (or evicting it): wait, but not past a drain
                # or the job's lifetime, and keep the job's keepalives going
                now = time.time()
                drain_at = sv.stop_at()
                if sv.deadline is not None and now >= sv.deadline:
                    raise Interrupted(f"waiting for the environment build: {TIMED_OUT}")
                if drain_at is not None and now >= drain_at:
                    raise Interrupted(f"waiting for the environment build: {INTERRUPTED}")
                if now >= next_tick:
                    sv.tick()
                    next_tick = now + sv.tick_s
                time.sleep(min(0.1, sv.tick_s))
            (venv / ".last_used").touch()
        except BaseException:
            lock.close()
            raise
        if not built:
            self.stats["hits"] += 1
        self.evict(keep=key)
        return PythonEnv(python=str(venv / "bin" / "python"), bin_dir=venv / "bin", key=key,
                         reused=not built, _lock=lock)

    def _build(self, key: str, requirements: list[str], python: str, sv: Supervision,
               build_as: Optional[BuildUser], progress: Progress) -> None:
        """Build `key`'s venv and publish it (hold the exclusive lock): by uv when there is a
        uv cache, by pip when there is none or uv rejects the set."""
        uvc = self.uv_cache
        if uvc is not None and uvc.uv:
            try:
                installed = self._in_fresh_dir(
                    key, requirements, sv, progress, lambda build, log, watched: self._uv_install(
                        build, log, requirements, python, watched, build_as, uvc), None)
            except _UvRejected as e:
                progress.line(f"uv cannot install this set ({e}); building it with pip instead, "
                              f"as the workload's user")
            else:
                uvc.used(installed)
                self._compile_later(key)
                try:
                    uvc.evict(keep=installed, env=self._env())
                except (OSError, subprocess.SubprocessError):
                    pass  # trimmed after a later build
                return
        elif uvc is not None:
            progress.line("uv is not installed (pip install uv): building with pip")
        self._in_fresh_dir(key, requirements, sv, progress, lambda build, log, watched: self._pip_install(
            build, log, requirements, python, watched, build_as), build_as)

    def _env(self) -> dict:
        return dict(self.build_env if self.build_env is not None else base_env(os.environ))

    def _in_fresh_dir(self, key: str, requirements: list[str], sv: Supervision, progress: Progress,
                      install: Callable[[Path, IO, Supervision], object], build_as: Optional[BuildUser]):
        """Run `install(build_dir, log, sv)` in a fresh `.<key>.*` directory (its log followed
        for `progress` at every tick of `sv`), then seal and publish it as `key`; install's
        answer is returned. A failure leaves nothing behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            os.chmod(build, 0o755)
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
            (build / ".size").write_text(str(_dir_bytes(build)))
            (build / ".complete").write_text(f"{time.time()}\n")
            self._remove(key)  # a venv of the old layout that died half way
            link = self.root / f".{key}.link"
            link.unlink(missing_ok=True)
            os.symlink(build.name, link)
            os.replace(link, self.path(key))
            return answer
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise

    def _uv_install(self, build: Path, log: IO, requirements: list[str], python: str, sv: Supervision,
                    build_as: Optional[BuildUser], uvc: UvCache) -> list[str]:
        """uv venv + uv pip install --no-build as root (in the job's cgroup), from the shared
        cache; the names installed. Raises _UvRejected for a set uv's resolver refuses."""
        # root (the cache is root's), in the job's cgroup; as itself outside a slot
        as_root = BuildUser(0, 0, build_as.preexec) if build_as is not None else None
        env = self._env()
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
        steps = [[uvc.uv, "venv", "--quiet", "--allow-existing", "--no-python-downloads",
                  "--python", python, str(build)]]
        if requirements:
            steps.append([uvc.uv, "pip", "install", "--verbose", "--python", str(build / "bin" / "python"),
                          "--cache-dir", str(uvc.root), "--link-mode", mode, "--no-build",
                          "--no-python-downloads", "--", *requirements])
        hold = uvc.lock(fcntl.LOCK_SH)
        try:
            for argv in steps:
                self._run(argv, log, env, build, sv, as_root)
        except EnvBuildFailed as e:
            if "No solution found" in e.summary:
                raise _UvRejected(e.summary) from None
            raise
        finally:
            hold.close()
        log.seek(0)
        return re.findall(r"^ \+ ([A-Za-z0-9._-]+)==", log.read().decode(errors="replace"), re.M)

    def _pip_install(self, build: Path, log: IO, requirements: list[str], python: str, sv: Supervision,
                     build_as: Optional[BuildUser]) -> None:
        env = self._env()
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
            self._run(argv, log, env, cwd, sv, build_as)
        if build_as is not None:
            shutil.rmtree(cwd)

    def _compile_later(self, key: str) -> None:
        """Byte-compile the published venv in the background, as root (the venv is sealed)."""
        self._compiling = [p for p in self._compiling if p.poll() is None]
        venv = self.root / os.readlink(self.path(key))
        try:
            self._compiling.append(subprocess.Popen(
                [str(venv / "bin" / "python"), "-m", "compileall", "-q", "-j", "1", str(venv / "lib")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                start_new_session=True, env=self._env(), preexec_fn=lambda: os.umask(0o022)))
        except OSError:
            pass  # workloads compile in memory instead

    def _run(self, argv: list[str], log: IO, env: dict, cwd: Path, sv: Supervision,
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

    def _remove(self, key: str) -> None:
        """Unpublish and delete `key`'s venv (hold its exclusive lock)."""
        link = self.path(key)
        if link.is_symlink():
            target = self.root / os.path.basename(os.readlink(link))
            link.unlink()
            shutil.rmtree(target, ignore_errors=True)
        elif link.exists():
            shutil.rmtree(link, ignore_errors=True)

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, key) of complete venvs, least recently used first."""
        out = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            if d.name.startswith(".") or not (d / ".complete").exists():
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

    def _free(self, key: str) -> Optional[IO]:
        """`key`'s lock, held exclusively, if nobody uses or builds the venv; else None."""
        lock = self._lock_file(key)
        if _try_lock(lock, fcntl.LOCK_EX):
            return lock
        lock.close()
        return None

    def evict(self, keep: Optional[str] = None) -> list[str]:
        """Remove least recently used venvs nobody uses until the cache fits its bounds, and
        what builds that died left behind."""
        entries = self.entries()
        count = len(entries)
        total = sum(s for _, s, _ in entries)
        removed = []
        for _, size, key in entries:
            if count <= self.max_count and total <= self.max_bytes:
                break
            lock = None if key == keep else self._free(key)
            if lock is None:
                continue  # in use or being built
            with lock:
                self._remove(key)
            removed.append(key)
            count -= 1
            total -= size
        for left in self.root.glob(".*.*"):
            key = left.name[1:].split(".", 1)[0]
            lock = self._free(key)
            if lock is not None:
                with lock:
                    self._remove_leftover(key, left)
        return removed

    def _remove_leftover(self, key: str, path: Path) -> None:
        link = self.path(key)
        if link.is_symlink() and os.path.basename(os.readlink(link)) == path.name:
            return  # the published venv
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


def system_env(python: str) -> PythonEnv:
    """The configured interpreter, used as it is."""
    return PythonEnv(python=python, bin_dir=None, key=None, reused=True)
