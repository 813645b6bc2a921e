"""Bytecode for a uv-built venv, compiled by the workload's user, never by root.

uv unpacks wheels without compiling them. Byte-compiling starts the venv's interpreter, and
an interpreter runs every `.pth` line in site-packages at start: code from the requirement
set. So root never compiles: the build user (the workload's account, inside the job's
cgroup, as the pip path builds) runs `compileall -I -S` with `-X pycache_prefix` pointing at
a folder of its own, and writes nowhere in the venv. It runs before the venv is sealed, so it
adds to the time a new set takes (packages' test folders are skipped to keep that short). Root then copies in what it made, as
bytes it never runs: only `NAME.cpython-XY.pyc` beside an existing `NAME.py` of the venv,
regular files the build user owns with one link, opened without following symlinks. A
`.pyc` that does not match its source is a problem of the set's own code, which every job
of the set runs anyway, not a way into root or another tenant. Nobody compiles when the
build user would be root (workloads run as root); compiling never fails a build.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Optional

_PYC = re.compile(r"(?P<stem>[^/]+)\.(?P<tag>[a-z]+-\d+)\.pyc")
_MAX_PYC = 64 << 20
# packages' own test suites (half the files of numpy and pandas, rarely imported by a job):
# left to compile in memory if a job ever imports them, which keeps a new set's build short
_NOT_COMPILED = r"site-packages/(.+/)?tests?/"


def compile_venv(build: Path, uid: Optional[int], gid: Optional[int],
                 run: Callable[[list[str], Path], None]) -> int:
    """Byte-compile `build/lib` as uid:gid through `run(argv, cwd)` (which starts it as the
    build user, in the job's cgroup, under the job's supervision, and says in the build's log
    when it fails) and copy the bytecode in; the number of files copied. `uid` None: as
    ourselves, unless we are root."""
    if uid is None and os.geteuid() == 0:
        return 0
    build = Path(os.path.realpath(build))  # the folders compileall names are the real ones
    stage = Path(tempfile.mkdtemp(prefix=".bytecode.", dir=build))
    try:
        if uid is not None:
            os.chmod(build, 0o711)  # the build user passes through; what it reads is 0755/0644
            os.chown(stage, uid, gid)
        try:
            jobs = len(os.sched_getaffinity(0))
        except OSError:
            jobs = 1
        run([str(build / "bin" / "python"), "-I", "-S", "-X", f"pycache_prefix={stage}", "-m", "compileall",
             "-q", "-j", str(jobs), "-x", _NOT_COMPILED, str(build / "lib")], stage)
        return place(stage, build, uid)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def place(stage: Path, build: Path, uid: Optional[int]) -> int:
    """Copy `stage/<abs source folder>/NAME.TAG.pyc` to `<source folder>/__pycache__/` when
    `<source folder>/NAME.py` is a regular file of `build`; the number copied."""
    top = os.path.realpath(build) + "/"
    own = os.path.realpath(stage) + "/"
    copied = 0
    for dirpath, _dirs, files, dirfd in os.fwalk(stage, follow_symlinks=False):
        source_dir = "/" + os.path.relpath(dirpath, stage)
        if (not source_dir.startswith(top) or (source_dir + "/").startswith(own)
                or os.path.realpath(source_dir) != source_dir or not _ours(source_dir)):
            continue  # only the venv's own folders, never the build user's stage
        for name in files:
            m = _PYC.fullmatch(name)
            if m is None or not _regular(os.path.join(source_dir, m.group("stem") + ".py")):
                continue
            data = _read(name, dirfd, uid)
            if data is not None and _write(Path(source_dir) / "__pycache__", name, data):
                copied += 1
    return copied


def _ours(folder: str) -> bool:
    try:
        return os.lstat(folder).st_uid == os.geteuid()
    except OSError:
        return False


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read(name: str, dirfd: int, uid: Optional[int]) -> Optional[bytes]:
    """The file's bytes if it is a plain, single-link file of the build user's; else None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > _MAX_PYC
                or (uid is not None and st.st_uid != uid)):
            return None
        return f.read(_MAX_PYC + 1)[:_MAX_PYC]


def _write(cache: Path, name: str, data: bytes) -> bool:
    """`cache/name` made ours (root's) with `data`, unless the venv already has it."""
    try:
        if not os.path.lexists(cache):
            os.mkdir(cache, 0o755)
        if not stat.S_ISDIR(os.lstat(cache).st_mode) or os.path.lexists(cache / name):
            return False
        fd, tmp = tempfile.mkstemp(prefix=".pyc.", dir=cache)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, cache / name)
        return True
    except OSError:
        return False
