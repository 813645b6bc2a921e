"""appliance/pyenv: requirement sets, the venv cache (built once, reused by many at once, evicted),
builds as the workload's user and pip failures."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from appliance import pyenv
from appliance.process import Supervision
from appliance.pyenv import VenvCache
from appliance.pyenv import bytecode
from appliance.pyenv.build import seal
from appliance.pyenv.interpreter import python_version
from appliance.pyenv.requirements import canonical_name, env_key

PYTHON = pyenv.interpreter_for("3.11")
NOBODY = 65534


def test_requirement_set_drops_studioml_and_client_paths():
    reqs = pyenv.requirement_set(
        ["numpy==2.4.6", "studioml==0.0.49", "StudioML==0.0.48", "-e git+https://x#egg=y",
         "mypkg @ file:///home/user/mypkg", "", "# comment", "six==1.17.0"],
        ["numpy==2.4.6", "tqdm"])
    assert reqs.lines == ["numpy==2.4.6", "six==1.17.0", "tqdm"]
    assert reqs.skipped == ["-e git+https://x#egg=y", "mypkg @ file:///home/user/mypkg"]


@pytest.mark.parametrize("line", [
    "-r /etc/shadow", "--requirement=/etc/shadow", "-c /etc/shadow", "--index-url https://evil.example/simple",
    "--extra-index-url=https://evil.example/simple", "pkg @ git+https://evil.example/pkg.git",
    "pkg @ https://evil.example/pkg-1.0.tar.gz", "git+https://evil.example/pkg.git", "./mypkg", "/tmp/mypkg",
    "evil-1.0.tar.gz", "evil-1.0-py3-none-any.whl", "six==1.17.0 --hash=sha256:00", "six; python_version >",
])
def test_anything_but_a_requirement_specifier_is_refused(line):
    with pytest.raises(pyenv.BadRequirement) as e:
        pyenv.requirement_set(["six==1.17.0"], [line])
    assert f"config.pip line {line!r}" in str(e.value)
    assert "only requirement specifiers like 'numpy==1.26.4' are accepted" in str(e.value)


def test_every_refused_line_is_named_and_accepted_lines_are_normalized():
    with pytest.raises(pyenv.BadRequirement) as e:
        pyenv.requirement_set(["-r /etc/shadow", "six==1.17.0", "x @ https://evil.example/x.whl"])
    assert "'-r /etc/shadow' is a pip option" in str(e.value)
    assert "'x @ https://evil.example/x.whl' is a direct reference" in str(e.value)
    reqs = pyenv.requirement_set(["Six >= 1.0", "tqdm [notebook] ==4.66.1 ; python_version>'3.8'"])
    assert reqs.lines == ["Six>=1.0", 'tqdm[notebook]==4.66.1; python_version > "3.8"']


def test_a_pip_option_never_reaches_pip(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("appliance-secret-line-0xfeed\n")
    cache = VenvCache(tmp_path / "venvs")
    with pytest.raises(pyenv.BadRequirement) as e:
        cache.prepare([f"-r {secret}"], PYTHON)
    assert "appliance-secret-line" not in str(e.value)
    assert cache.entries() == []


@pytest.mark.parametrize("name", ["Django", "zope.interface", "Foo__Bar-._baz", "a", "A-B_C.D", "ruamel.yaml.clib",
                                  "Pillow", "typing_extensions", "x..y"])
def test_a_distribution_name_is_normalized_as_packaging_does(name):
    from packaging.utils import canonicalize_name
    assert canonical_name(name) == canonicalize_name(name)


def test_key_depends_on_the_set_not_its_order():
    a = env_key(pyenv.requirement_set(["b==1", "a==2"]), "3.11.7")
    b = env_key(pyenv.requirement_set(["a==2", "b==1", "studioml==0.0.49"]), "3.11.7")
    assert a == b
    assert a != env_key(["a==2"], "3.11.7")
    assert a != env_key(pyenv.requirement_set(["b==1", "a==2"]), "3.12.1")


def test_interpreter_for_falls_back_to_the_runner_python():
    assert Path(pyenv.interpreter_for("2.1")).exists()
    assert Path(pyenv.interpreter_for(None)).exists()


def test_empty_set_builds_once_then_reuses(tmp_path):
    cache = VenvCache(tmp_path / "venvs")
    first = cache.prepare([], PYTHON)
    first.release()
    assert not first.reused and Path(first.python).exists()
    second = cache.prepare([], PYTHON)
    second.release()
    assert second.reused and second.key == first.key and second.python == first.python
    out = subprocess.run([second.python, "-c", "import sys; print(sys.prefix)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "venvs" / first.key)


def test_requirements_are_installed_and_the_venv_is_isolated(tmp_path):
    cache = VenvCache(tmp_path / "venvs")
    t0 = time.monotonic()
    env = cache.prepare(["six==1.17.0"], PYTHON)
    built = time.monotonic() - t0
    env.release()
    t0 = time.monotonic()
    again = cache.prepare(["six==1.17.0"], PYTHON)
    reused = time.monotonic() - t0
    again.release()
    print(f"\nvenv with six: built in {built:.2f}s, reused in {reused:.3f}s "
          f"({built / max(reused, 1e-6):.0f}x)")
    assert again.reused
    code = "import six; print(six.__version__)\ntry:\n import boto3\nexcept ImportError: print('isolated')"
    out = subprocess.run([again.python, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1.17.0", "isolated"]


def test_pip_failure_is_text_for_the_output_not_a_crash(tmp_path):
    cache = VenvCache(tmp_path / "venvs")
    with pytest.raises(pyenv.EnvBuildFailed) as e:
        cache.prepare(["appliance-no-such-package-0xdead==9.9.9"], PYTHON)
    text = str(e.value)
    assert "building the Python environment failed" in text
    assert "appliance-no-such-package-0xdead" in text  # pip's own error
    assert cache.entries() == []  # nothing half-built left as if complete


def test_a_stopped_build_leaves_nothing_behind(tmp_path):
    cache = VenvCache(tmp_path / "venvs")
    with pytest.raises(pyenv.Interrupted):
        cache.prepare(["six==1.17.0"], PYTHON,
                      Supervision(stop_at=lambda: time.time(), tick_s=0.01, term_grace_s=1))
    assert cache.entries() == []
    env = cache.prepare([], PYTHON)  # the cache still works
    env.release()
    hidden = [p.name for p in (tmp_path / "venvs").iterdir() if p.name.startswith(".")]
    assert hidden == [os.readlink(tmp_path / "venvs" / env.key)]  # only the venv just built


def _key(reqs, python=PYTHON):
    """The cache key of already normalized requirement lines."""
    return env_key(sorted(reqs), python_version(python))


def test_leftovers_of_a_build_that_died_are_removed(tmp_path):
    cache = VenvCache(tmp_path / "venvs")
    key = _key(["six==1.17.0"])
    dead = tmp_path / "venvs" / f".{key}.deadbuild"
    (dead / "lib").mkdir(parents=True)
    env = cache.prepare([], PYTHON)
    env.release()
    assert not dead.exists()


HOLD = """
import pathlib, sys, time
from appliance.pyenv import VenvCache
root, python, me, other = sys.argv[1:5]
env = VenvCache(pathlib.Path(root)).prepare(["six==1.17.0"], python)
pathlib.Path(me + ".start").write_text(repr(time.time()))
give_up = time.time() + 30
while not pathlib.Path(other + ".start").exists() and time.time() < give_up:
    time.sleep(0.05)
pathlib.Path(me + ".end").write_text(repr(time.time()))
print("reused" if env.reused else "built", env.python)
env.release()
"""


def test_jobs_with_the_same_environment_use_it_at_the_same_time(tmp_path):
    names = [str(tmp_path / "a"), str(tmp_path / "b")]
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "venvs"), PYTHON, me, other],
                              stdout=subprocess.PIPE, text=True)
             for me, other in (names, names[::-1])]
    outs = [p.communicate(timeout=600)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[0] for o in outs) == ["built", "reused"]
    assert outs[0][1] == outs[1][1]  # the same venv
    starts = [float(Path(n + ".start").read_text()) for n in names]
    ends = [float(Path(n + ".end").read_text()) for n in names]
    assert max(starts) < min(ends), "one job waited for the other to release the venv"


WAIT = """
import pathlib, sys, time
from appliance.process import Supervision
from appliance.pyenv import Interrupted, VenvCache
root, python, how = sys.argv[1:4]
ticks = []
limit = time.time() + 1
sv = Supervision(tick=lambda: ticks.append(time.time()), tick_s=0.1,
                 **({"deadline": limit} if how == "deadline" else {"stop_at": lambda: limit}))
try:
    VenvCache(pathlib.Path(root)).prepare(["six==1.17.0"], python, sv)
    print("prepared")
except Interrupted as e:
    print(f"Interrupted {len(ticks)} {e}")
"""


@pytest.mark.parametrize("how,why", [("stop_at", "interrupted"), ("deadline", "timed out")])
def test_a_runner_waiting_for_another_build_keeps_alive_and_gives_up_in_time(tmp_path, how, why):
    root = tmp_path / "venvs"
    root.mkdir()
    (tmp_path / "locks").mkdir(mode=0o700)  # the cache's lock folder, beside it
    with open(tmp_path / "locks" / f"{_key(['six==1.17.0'])}.lock", "a") as building:  # another runner builds it
        fcntl.flock(building, fcntl.LOCK_EX)
        out = subprocess.run([sys.executable, "-c", WAIT, str(root), PYTHON, how],
                             capture_output=True, text=True, timeout=60).stdout.strip().split(maxsplit=2)
    assert out[0] == "Interrupted" and int(out[1]) >= 3, out  # keepalives went on while waiting
    assert out[2] == f"waiting for the environment build: {why}"


@pytest.fixture
def open_dir():
    """A directory other users can reach (pytest's tmp_path is under a 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="appliance-test-pyenv-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_nobody(argv):
    return subprocess.run(argv, capture_output=True, text=True, user=NOBODY, group=NOBODY, extra_groups=[],
                          env={"PATH": "/usr/bin:/bin", "HOME": "/"}, cwd="/", timeout=120)


def test_built_as_the_workload_user_then_read_only_to_workloads(open_dir):
    assert os.geteuid() == 0, "run the tests as root (tests/run.sh)"
    python = shutil.which("python3", path="/usr/bin:/bin")  # one the workload user may run
    cache = VenvCache(open_dir / "venvs")
    env = cache.prepare(["six==1.17.0"], python, build_as=pyenv.BuildUser(NOBODY, NOBODY))
    env.release()
    real = Path(os.path.realpath(open_dir / "venvs" / env.key))
    for dirpath, dirnames, filenames in os.walk(real):
        for p in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            st = os.lstat(p)
            assert st.st_uid == 0 and st.st_gid == 0, p
            if not stat.S_ISLNK(st.st_mode):
                assert not st.st_mode & 0o022 and not st.st_mode & 0o6000, (p, oct(st.st_mode))
    assert not (real / ".home").exists()
    plant = ("import six, site, sys\n"
             "try:\n open(site.getsitepackages()[0] + '/sitecustomize.py', 'w')\n"
             "except PermissionError: print(six.__version__, 'read-only')\n")
    out = _as_nobody([env.python, "-c", plant])
    assert out.stdout.split() == ["1.17.0", "read-only"], out.stderr


def test_the_build_runs_as_the_user_after_the_callers_preexec_ran_as_root(open_dir):
    assert os.geteuid() == 0, "run the tests as root (tests/run.sh)"
    who = open_dir / "who"
    who.touch(mode=0o666)
    os.chmod(who, 0o666)
    wrapper = open_dir / "python"  # records who runs `python -m venv`
    wrapper.write_text(f"#!/bin/sh\nid -u >> {who}\nexec {shutil.which('python3', path='/usr/bin:/bin')} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    preexec_uid = open_dir / "preexec"
    user = pyenv.BuildUser(NOBODY, NOBODY, preexec=lambda: preexec_uid.write_text(str(os.geteuid())))
    env = VenvCache(open_dir / "venvs").prepare([], str(wrapper), build_as=user)
    env.release()
    assert who.read_text().split()[-1] == str(NOBODY)
    assert preexec_uid.read_text() == "0"  # (so it can join the job cgroup)


def test_seal_takes_the_tree_from_the_build_user(tmp_path):
    top = tmp_path / "venv"
    (top / "lib").mkdir(parents=True)
    (top / "lib" / "mod.py").write_text("")
    os.chmod(top / "lib", 0o2777)
    os.chmod(top / "lib" / "mod.py", 0o4777)
    os.symlink("/etc/passwd", top / "lib" / "link")
    for p in (top, top / "lib", top / "lib" / "mod.py"):
        os.chown(p, NOBODY, NOBODY)
    os.lchown(top / "lib" / "link", NOBODY, NOBODY)
    passwd = os.stat("/etc/passwd")
    seal(top, NOBODY)
    for p in (top, top / "lib", top / "lib" / "mod.py", top / "lib" / "link"):
        assert os.lstat(p).st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(top / "lib").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(top / "lib" / "mod.py").st_mode) == 0o755  # no setuid root file
    assert os.stat("/etc/passwd") == passwd  # the symlink was not followed


def test_two_runners_build_the_same_set_once(tmp_path):
    prog = textwrap.dedent(f"""
        import sys
        from appliance.pyenv import VenvCache
        env = VenvCache(__import__("pathlib").Path({str(tmp_path / "venvs")!r})).prepare(
            ["six==1.17.0"], {PYTHON!r})
        print("reused" if env.reused else "built")
        """)
    procs = [subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = sorted(p.communicate(timeout=600)[0].strip() for p in procs)
    assert results == ["built", "reused"]


def test_lru_eviction_spares_venvs_in_use(tmp_path):
    cache = VenvCache(tmp_path / "venvs", max_count=1)
    a = cache.prepare([], PYTHON)  # held: in use
    b = cache.prepare(["six==1.17.0"], PYTHON)
    assert {k for _, _, k in cache.entries()} == {a.key, b.key}  # a in use, b just built
    a.release()
    b.release()
    c = cache.prepare(["six==1.17.0"], PYTHON)  # reuse b; a is LRU and free now
    c.release()
    assert c.reused
    assert [k for _, _, k in cache.entries()] == [b.key]
    assert not (tmp_path / "venvs" / a.key).exists()


def test_root_copies_in_only_bytecode_of_the_venvs_own_sources(tmp_path):
    """What the build user left in its stage is copied only as NAME.TAG.pyc beside the venv's
    own NAME.py: not a symlink, not a hard link, not into the stage, not for a missing source."""
    build = tmp_path / "venv"
    (build / "lib").mkdir(parents=True)
    for name in ("good", "linked", "hard", "nosource_ok"):
        (build / "lib" / f"{name}.py").write_text("")
    (build / "lib" / "nosource_ok.py").unlink()
    stage = build / ".bytecode.x"
    mirror = stage / str(build.resolve()).lstrip("/")
    (mirror / "lib").mkdir(parents=True)
    tag = sys.implementation.cache_tag
    (mirror / "lib" / f"good.{tag}.pyc").write_bytes(b"good")
    os.symlink("/etc/hostname", mirror / "lib" / f"linked.{tag}.pyc")
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    os.link(secret, mirror / "lib" / f"hard.{tag}.pyc")
    (mirror / "lib" / f"nosource_ok.{tag}.pyc").write_bytes(b"x")
    inner = stage / str(stage.resolve()).lstrip("/")  # "sources" in the stage itself
    inner.mkdir(parents=True)
    (stage / "evil.py").write_text("")
    (inner / f"evil.{tag}.pyc").write_bytes(b"evil")
    for dirpath, dirnames, filenames in os.walk(stage):
        for n in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            os.lchown(n, NOBODY, NOBODY)
    assert bytecode.place(stage, build, NOBODY) == 1
    assert (build / "lib" / "__pycache__" / f"good.{tag}.pyc").read_bytes() == b"good"
    assert sorted(p.name for p in (build / "lib" / "__pycache__").iterdir()) == [f"good.{tag}.pyc"]
    assert not (stage / "__pycache__").exists()
