"""The cache of venvs, keyed by requirement set: who builds, who waits, who may evict.

- Built once: the builder holds an exclusive fcntl lock on `LOCKS/<key>.lock` while it
  builds (build.py). LOCKS (`HOME/cache/locks`) is root's and 0700: a workload cannot open
  a lock, so it cannot hold one (locks.py).
- In use: a runner holds a shared lock on `<key>.lock` while its job runs, so any number of
  jobs use one venv at once, and eviction (which needs the exclusive lock, non-blocking)
  never removes a venv under a running job. Nobody blocks in flock: a runner waiting for
  someone else's build polls with LOCK_NB, keeps its job's keepalives going and gives up
  at a drain or the job's lifetime (Interrupted).
- Evicted least recently used (`.last_used` mtime) when there are more than `max_count`
  venvs or they take more than `max_bytes`.
- No `--system-site-packages`: the experiment gets exactly what its client had, not the
  appliance's own packages (boto3, supervisor, ...) in whatever versions the appliance uses;
  the price is that big frameworks are installed once per distinct requirement set.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Optional

from appliance.pyenv import build as _build
from appliance.pyenv.build import BuildUser, Interrupted
from appliance.pyenv.interpreter import python_version
from appliance.pyenv.locks import open_lock
from appliance.pyenv.progress import Progress
from appliance.pyenv.requirements import env_key, normalized
from appliance.pyenv.uvcache import UvCache
from appliance.process import INTERRUPTED, TIMED_OUT, Supervision, base_env


EVICT_EVERY_S = 60.0  # a venv reused looks at the cache's bounds at most this often


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


def _try_lock(f: IO, how: int) -> bool:
    try:
        fcntl.flock(f, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class VenvCache:
    """The venvs under `root`, one per requirement set (see the module docstring)."""

    def __init__(self, root: Path, max_bytes: int = 20 << 30, max_count: int = 20,
                 build_env: Optional[dict] = None, uv_cache: Optional[UvCache] = None,
                 locks: Optional[Path] = None):
        self.root = Path(root)
        self.locks = Path(locks) if locks is not None else self.root.parent / "locks"
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.build_env = build_env  # environment for venv/pip (None: the runner's, cleaned)
        self.stats = {"hits": 0, "misses": 0, "build_failures": 0, "build_seconds": 0.0}  # for /metrics
        self.uv_cache = uv_cache  # None: every set is built by pip, as before
        self._evicted_at = float("-inf")
        self._over = False  # the last eviction left more than the bounds (venvs in use)

    def path(self, key: str) -> Path:
        """Where the venv for `key` is used from (a symlink to its build directory)."""
        return _build.venv_path(self.root, key)

    def _lock_file(self, key: str) -> IO:
        return open_lock(self.locks, f"{key}.lock")

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
                            _build.build(self.root, key, reqs, python, sv, build_as, progress, self._env(),
                                         self.uv_cache)
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
        # a hit adds nothing to evict: the bounds are looked at after a build, while the cache is
        # still over them (what it could not evict was in use), and once a minute
        if built or self._over or time.monotonic() - self._evicted_at > EVICT_EVERY_S:
            self._evicted_at = time.monotonic()
            self.evict(keep=key)
        return PythonEnv(python=str(venv / "bin" / "python"), bin_dir=venv / "bin", key=key,
                         reused=not built, _lock=lock)

    def _env(self) -> dict:
        return dict(self.build_env if self.build_env is not None else base_env(os.environ))

    def _remove(self, key: str) -> None:
        _build.remove(self.root, key)

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
        self._over = count > self.max_count or total > self.max_bytes
        for old in self.root.glob("*.lock"):  # lock files of an earlier layout, openable by anyone
            old.unlink(missing_ok=True)
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
