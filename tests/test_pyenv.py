"""pyenv.py: requirement sets, the venv cache (built once, reused, evicted) and pip failures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from appliance.runner import pyenv
from appliance.runner.execute import Supervision
from appliance.runner.pyenv import VenvCache

PYTHON = pyenv.interpreter_for("3.11")


def test_requirement_set_drops_studioml_and_client_paths():
    reqs = pyenv.requirement_set(
        ["numpy==2.4.6", "studioml==0.0.49", "StudioML==0.0.48", "-e git+https://x#egg=y",
         "mypkg @ file:///home/user/mypkg", "", "# comment", "six==1.17.0"],
        ["numpy==2.4.6", "tqdm"])
    assert reqs == ["numpy==2.4.6", "six==1.17.0", "tqdm"]


def test_key_depends_on_the_set_not_its_order():
    a = pyenv.env_key(pyenv.requirement_set(["b==1", "a==2"]), "3.11.7")
    b = pyenv.env_key(pyenv.requirement_set(["a==2", "b==1", "studioml==0.0.49"]), "3.11.7")
    assert a == b
    assert a != pyenv.env_key(["a==2"], "3.11.7")
    assert a != pyenv.env_key(pyenv.requirement_set(["b==1", "a==2"]), "3.12.1")


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


def test_two_runners_build_the_same_set_once(tmp_path):
    prog = textwrap.dedent(f"""
        import sys
        from appliance.runner.pyenv import VenvCache
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
