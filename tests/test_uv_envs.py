"""appliance/pyenv with uv: one shared, root-written cache linked into sealed venvs; pip as the fallback;
progress while a set builds; bad input (unresolvable, unreachable index, full disk); the bound."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from appliance.doctor import _check_env_cache
from appliance.paths import Home
from appliance import pyenv
from appliance.pyenv import UvCache, VenvCache
from appliance.process import Supervision
from tests.wheels import make_wheel, marker_wheel, offline_env

NOBODY = 65534
PYTHON = shutil.which("python3", path="/usr/bin:/bin")  # one the workload user may run


@pytest.fixture
def home():
    """An appliance home other users can reach (pytest's tmp_path is under a 0700 folder)."""
    assert os.geteuid() == 0, "run the tests as root (tests/run.sh)"
    d = Path(tempfile.mkdtemp(prefix="appliance-test-uv-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield Home(d)
    subprocess.run(["umount", "-q", str(d / "cache")], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def caches(home: Home, max_bytes: int = 1 << 30, env: dict | None = None) -> tuple[UvCache, VenvCache]:
    uvc = UvCache(home.uv_cache, max_bytes)
    return uvc, VenvCache(home.venv_cache, uv_cache=uvc, build_env=env)


class Seen:
    def __init__(self):
        self.lines, self.steps = [], []
        self.progress = pyenv.Progress(line=self.lines.append, step=self.steps.append)


def _as_nobody(argv):
    return subprocess.run(argv, capture_output=True, text=True, user=NOBODY, group=NOBODY, extra_groups=[],
                          env={"PATH": "/usr/bin:/bin", "HOME": "/"}, cwd="/", timeout=120)


def _site(env) -> Path:
    return Path(os.path.realpath(Path(env.python).parent.parent)) / "lib" / "python3.11" / "site-packages"


def test_a_new_set_is_built_from_the_shared_cache_and_workloads_cannot_touch_the_cache(home):
    uvc, venvs = caches(home)
    nobody = pyenv.BuildUser(NOBODY, NOBODY)
    first = Seen()
    a = venvs.prepare(["six==1.17.0"], PYTHON, build_as=nobody, progress=first.progress)
    a.release()
    assert "downloading six-1.17.0-py2.py3-none-any.whl" in first.lines
    # a set the cache never saw, whose packages it holds: nothing is downloaded
    second = Seen()
    b = venvs.prepare(["six==1.17.0", "appliance-never-heard-of; python_version < '3'"], PYTHON, build_as=nobody,
                      progress=second.progress)
    b.release()
    assert b.key != a.key and not b.reused
    assert not [t for t in second.lines if t.startswith("downloading")], second.lines
    six = _site(b) / "six.py"
    st = os.stat(six)
    assert uvc.link_mode() == "clone" or st.st_nlink >= 3  # the cache's inode, in both venvs
    assert st.st_uid == 0 and not st.st_mode & 0o022
    assert stat.S_IMODE(os.stat(home.uv_cache).st_mode) == 0o700 and os.stat(home.uv_cache).st_uid == 0
    before = six.read_bytes()
    attack = (f"import os\nfor how in (lambda: open({str(six)!r}, 'a'), lambda: os.chmod({str(six)!r}, 0o666),\n"
              f"            lambda: os.unlink({str(six)!r}), lambda: os.listdir({str(home.uv_cache)!r})):\n"
              "    try:\n        how(); print('CHANGED')\n    except PermissionError:\n        print('refused')\n")
    out = _as_nobody([b.python, "-c", attack])
    assert out.stdout.split() == ["refused"] * 4, (out.stdout, out.stderr)
    assert six.read_bytes() == before
    out = _as_nobody([b.python, "-c", "import six; print(six.__version__)"])
    assert out.stdout.strip() == "1.17.0", out.stderr


def test_progress_names_what_is_resolved_and_downloaded_and_counts_steps(home):
    _, venvs = caches(home)
    seen = Seen()
    venvs.prepare(["packaging==24.0", "six==1.17.0"], PYTHON, progress=seen.progress).release()
    assert "resolving: six==1.17.0" in seen.lines and "resolving: packaging==24.0" in seen.lines
    assert "downloading packaging-24.0-py3-none-any.whl" in seen.lines
    assert any(t.startswith("Resolved 2 packages") for t in seen.lines)
    assert seen.steps[-1] == "building env (2/2)" and "building env (1/2)" in seen.steps


def test_a_set_uv_rejects_is_built_by_pip_as_the_workload_with_the_reason_in_the_log(home):
    uvc, venvs = caches(home)
    seen = Seen()  # docopt 0.6.2 has only a source distribution: uv --no-build refuses it
    env = venvs.prepare(["docopt==0.6.2"], PYTHON, build_as=pyenv.BuildUser(NOBODY, NOBODY), progress=seen.progress)
    env.release()
    why = [t for t in seen.lines if t.startswith("uv cannot install this set")]
    assert why and "docopt==0.6.2 has no usable wheels" in why[0], seen.lines
    assert any("Successfully installed docopt" in t for t in seen.lines)
    out = _as_nobody([env.python, "-c", "import docopt; print(docopt.__version__)"])
    assert out.stdout.strip() == "0.6.2", out.stderr
    assert not list(uvc.root.rglob("docopt.py"))  # nothing pip built reached the shared cache


def test_bad_sets_fail_naming_the_requirement_and_the_next_good_set_builds(home):
    _, venvs = caches(home)
    with pytest.raises(pyenv.EnvBuildFailed) as e:
        venvs.prepare(["appliance-no-such-package-0xdead==9.9.9"], PYTHON)
    assert "appliance-no-such-package-0xdead" in e.value.summary
    down = dict(os.environ, PIP_INDEX_URL="http://127.0.0.1:9/simple")  # uv takes the admin's pip index too
    _, offline = caches(home, env=down)
    with pytest.raises(pyenv.EnvBuildFailed) as e:
        offline.prepare(["six==1.17.0"], PYTHON)
    assert "127.0.0.1:9/simple/six" in e.value.summary, e.value.summary
    assert venvs.entries() == [] and not list(home.venv_cache.glob(".*.*"))
    env = venvs.prepare(["six==1.17.0"], PYTHON)
    env.release()
    assert subprocess.run([env.python, "-c", "import six"]).returncode == 0


def test_a_full_disk_fails_the_build_and_leaves_the_cache_usable(home):
    home.cache_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(home.cache_dir)], check=True)
    _, venvs = caches(home)
    with pytest.raises(pyenv.EnvBuildFailed) as e:
        venvs.prepare(["pip==24.0"], PYTHON)  # a 2 MB wheel, 9 MB unpacked: twice that does not fit
    assert "pip" in e.value.summary and "No space left on device" in str(e.value), e.value.summary
    assert venvs.entries() == []
    env = venvs.prepare(["six==1.17.0"], PYTHON)
    env.release()
    assert subprocess.run([env.python, "-c", "import six"]).returncode == 0


def test_two_slots_build_at_once_from_one_cache(home):
    uvc, venvs = caches(home)
    sets = [["six==1.17.0", "packaging==24.0"], ["six==1.17.0", "packaging==23.2"]]
    got, errors = [], []

    def build(reqs):
        try:
            env = VenvCache(home.venv_cache, uv_cache=UvCache(home.uv_cache)).prepare(reqs, PYTHON)
            env.release()
            got.append(env)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(s,)) for s in sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 2
    for env in got:
        out = subprocess.run([env.python, "-c", "import six, packaging; print(packaging.__version__)"],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    seen = Seen()  # the cache is whole: a third set needs nothing from the index but its listing
    venvs.prepare(["six==1.17.0", "packaging==23.2", "appliance-absent; python_version < '3'"], PYTHON,
                  progress=seen.progress).release()
    assert not [t for t in seen.lines if t.startswith("downloading")], seen.lines


def test_the_cache_is_bounded_least_recently_used_first_and_venvs_keep_their_files(home):
    uvc, venvs = caches(home)
    old = venvs.prepare(["six==1.17.0"], PYTHON)
    old.release()
    assert list(uvc.root.rglob("six.py"))
    uvc.max_bytes = uvc.size() + (16 << 10)  # room for six and a little, not for packaging too
    venvs.prepare(["packaging==24.0"], PYTHON).release()
    assert [p.name for p in uvc.used_dir.iterdir()] == ["packaging"]  # six was used least recently
    assert not list(uvc.root.rglob("six.py")) and list(uvc.root.rglob("packaging"))
    out = subprocess.run([old.python, "-c", "import six; print(six.__version__)"], capture_output=True, text=True)
    assert out.stdout.strip() == "1.17.0", out.stderr  # its files are its own links


def test_doctor_fails_when_cache_and_venvs_are_on_different_filesystems(home):
    home.venv_cache.mkdir(parents=True)
    home.uv_cache.mkdir(parents=True)
    assert _check_env_cache(home).ok
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(home.uv_cache)], check=True)
    try:
        found = _check_env_cache(home)
    finally:
        subprocess.run(["umount", str(home.uv_cache)], check=True)
    assert not found.ok and "different filesystems" in found.detail and "one filesystem" in found.detail


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_no_root_process_runs_code_from_a_requirement_set(home, installer):
    """A wheel's one-line .pth runs in every interpreter that starts in its venv: neither the
    build nor byte-compiling may start one as root. The job still gets the package, compiled."""
    wheels, marker = home.root / "wheels", home.root / "uids"
    marker_wheel(wheels, marker)
    uvc = UvCache(home.uv_cache) if installer == "uv" else None
    venvs = VenvCache(home.venv_cache, uv_cache=uvc, build_env=offline_env(wheels))
    env = venvs.prepare(["uidmark==1.0"], PYTHON, build_as=pyenv.BuildUser(NOBODY, NOBODY))
    env.release()
    package = _site(env) / "uidmark_mod"
    waited = time.monotonic() + 120  # (bytecode once came from a background process)
    while not list(package.glob("__pycache__/__init__.*.pyc")) and time.monotonic() < waited:
        time.sleep(0.1)
    assert list(package.glob("__pycache__/__init__.*.pyc")), "the venv has no bytecode"
    out = _as_nobody([env.python, "-c", "import uidmark_mod; print(uidmark_mod.VERSION)"])
    assert out.stdout.strip() == "1.0", out.stderr
    uids = marker.read_text().split()
    assert str(NOBODY) in uids and "0" not in uids, uids


HOLD = """
import fcntl, os, sys
held = []
for path in sys.argv[1:]:
    try:
        f = open(path, "rb")
    except PermissionError:
        continue
    fcntl.flock(f, fcntl.LOCK_EX)
    held.append(f)
print(len(held), flush=True)
sys.stdin.read()
"""


def test_a_workload_can_neither_open_nor_hold_the_locks_of_builds_and_jobs(home):
    uvc, venvs = caches(home)
    venvs.prepare(["six==1.17.0"], PYTHON).release()
    locks = [str(p) for p in home.root.rglob("*.lock") if p.name != ".lock"]  # (uv's own, in a venv)
    assert locks
    probe = "import sys\nfor p in sys.argv[1:]:\n    try:\n        open(p, 'rb'); print('opened', p)\n" \
            "    except PermissionError:\n        pass\n"
    out = _as_nobody([PYTHON, "-c", probe, *locks])
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr
    # a workload that takes every lock it can open stalls neither a job nor a build
    holder = subprocess.Popen([PYTHON, "-c", HOLD, *locks], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/")
    try:
        assert holder.stdout.readline().strip() == "0"
        done = []
        job = threading.Thread(target=lambda: done.append(venvs.prepare(
            ["six==1.17.0"], PYTHON, Supervision(deadline=time.time() + 60))))
        build = threading.Thread(target=lambda: done.append(VenvCache(home.venv_cache, uv_cache=UvCache(
            home.uv_cache)).prepare(["packaging==24.0"], PYTHON, Supervision(deadline=time.time() + 60))))
        for t in (job, build):
            t.start()
        for t in (job, build):
            t.join(120)
        assert sorted(env.reused for env in done) == [False, True], done
    finally:
        holder.kill()
        holder.wait()


PLANT = """
import os, sys, time
root, stop, lib = sys.argv[1:4]
planted = denied = 0
while not os.path.exists(stop):
    try:
        names = os.listdir(root)
    except PermissionError:
        denied, names = denied + 1, []
    for name in names:
        site = os.path.join(root, name, "lib", lib, "site-packages")
        try:
            os.makedirs(site, exist_ok=True)
            with open(os.path.join(site, "planted.pth"), "w") as f:
                f.write("import os\\n")
            planted += 1
        except OSError:
            pass
    time.sleep(0.002)
print(planted, denied)
"""


def test_a_build_directory_is_private_to_its_builder_even_with_one_shared_account(home):
    """isolation.user = one account for every slot: another slot's workload (the same uid as
    the pip build) looks for build directories to plant a .pth in, and finds none."""
    wheels = home.root / "wheels"
    make_wheel(wheels, "plain", "1.0", {"plain.py": "VALUE = 1\n"})
    home.venv_cache.mkdir(parents=True)
    stop = home.root / "stop"
    lib = "python%d.%d" % tuple(map(int, pyenv.interpreter.python_version(PYTHON).split(".")[:2]))
    attacker = subprocess.Popen([PYTHON, "-c", PLANT, str(home.venv_cache), str(stop), lib],
                                stdout=subprocess.PIPE, text=True, user=NOBODY, group=NOBODY, extra_groups=[],
                                cwd="/")
    try:
        venvs = VenvCache(home.venv_cache, build_env=offline_env(wheels))  # pip, as the shared account
        env = venvs.prepare(["plain==1.0"], PYTHON, build_as=pyenv.BuildUser(NOBODY, NOBODY))
        env.release()
    finally:
        stop.touch()
        planted, denied = map(int, attacker.communicate(timeout=60)[0].split())
    assert planted == 0 and denied > 0
    assert not list(Path(os.path.realpath(home.venv_cache / env.key)).rglob("planted.pth"))
    out = _as_nobody([env.python, "-c", "import plain; print(plain.VALUE)"])
    assert out.stdout.strip() == "1", out.stderr


def test_uv_reads_the_admins_settings_not_a_uv_toml_above_the_venvs(home, tmp_path):
    home.root.joinpath("uv.toml").write_text("this is = not toml =\n")  # e.g. in a folder workloads write
    home.root.joinpath("pyproject.toml").write_text("[tool.uv]\nindex-url = 'http://127.0.0.1:9/planted'\n")
    _, venvs = caches(home)
    venvs.prepare(["six==1.17.0"], PYTHON).release()
    admin = tmp_path / "uv.toml"  # what /etc/uv/uv.toml says is still obeyed
    admin.write_text("index-url = 'http://127.0.0.1:9/admins'\n")
    uvc = UvCache(home.uv_cache, system_config=admin)
    with pytest.raises(pyenv.EnvBuildFailed) as e:
        VenvCache(home.venv_cache, uv_cache=uvc).prepare(["packaging==24.0"], PYTHON)
    assert "127.0.0.1:9/admins" in str(e.value) and "planted" not in str(e.value), e.value.summary
