"""`appliance submit` packs the project's own environment and files, and refuses at once
what would fail later: against the real store, with the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from appliance.actions.submit import DEFAULT_QUEUE
from appliance.cli import main
from appliance.queues.local import LocalQueueSource
from appliance.studioml.request import parse_request

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def project(tmp_path) -> Path:
    p = tmp_path / "project"
    p.mkdir()
    (p / "train.py").write_text("import os, json\nprint('hello')\n")
    (p / "unique.txt").write_text(uuid.uuid4().hex)  # a workspace no other test sends
    return p


def submit(home, project, *args) -> int:
    return main(["--home", str(home.root), "submit", "--dir", str(project),
                 "--python", sys.executable, *args])


def queued(home, queue=DEFAULT_QUEUE):
    src = LocalQueueSource(home.queue_root, watch=False)
    msg = src.claim(queue)
    return parse_request(msg.body) if msg else None


def blobs(store) -> set:
    listed = store.client().list_objects_v2(Bucket=store.bucket, Prefix="blobstore/")
    return {o["Key"] for o in listed.get("Contents", [])}


# ---------------------------------------------------------------- the environment

def test_a_stdlib_only_script_gets_an_empty_environment(store_home, project, capsys):
    assert submit(store_home, project, "train.py") == 0
    assert "environment: none" in capsys.readouterr().err
    req = queued(store_home)
    assert req.pythonenv == () and req.pythonver == "%d.%d" % sys.version_info[:2]


def test_a_requirements_file_is_sent_exactly(store_home, project, capsys):
    (project / "requirements.txt").write_text("numpy==1.26.4\n# a comment\nrequests>=2\n")
    (project / "train.py").write_text("import boto3\n")  # the file wins over the imports
    assert submit(store_home, project, "--pip", "tqdm", "train.py") == 0
    err = capsys.readouterr().err
    assert "environment from requirements.txt: 2 packages, plus 1 from --pip" in err
    req = queued(store_home)
    assert req.pythonenv == ("numpy==1.26.4", "requests>=2") and req.pip == ("tqdm",)


def test_pyproject_dependencies_are_sent(store_home, project, capsys):
    (project / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["torch>=2"]\n')
    assert submit(store_home, project, "train.py") == 0
    assert "environment from pyproject.toml: 1 package" in capsys.readouterr().err
    assert queued(store_home).pythonenv == ("torch>=2",)


def test_imports_become_the_installed_versions(store_home, project, capsys):
    import boto3

    (project / "pkg").mkdir()
    (project / "pkg" / "__init__.py").write_text("")
    (project / "train.py").write_text("import os\nimport boto3\nimport pkg\nimport nosuchmodule_x\n"
                                      "import appliance  # this checkout, installed editable\n")
    assert submit(store_home, project, "train.py") == 0
    err = capsys.readouterr().err
    assert "environment from imports: 1 package" in err
    assert "not installed" in err and "nosuchmodule_x" in err
    assert "not sent: appliance (imported as appliance) (installed from a local folder" in err
    assert queued(store_home).pythonenv == (f"boto3=={boto3.__version__}",)


def test_freeze_sends_the_whole_interpreter(store_home, project, capsys):
    assert submit(store_home, project, "--freeze", "train.py") == 0
    assert "environment from pip freeze" in capsys.readouterr().err
    assert any(p.lower().startswith("boto3==") for p in queued(store_home).pythonenv)


# ---------------------------------------------------------------- refused at once

def write_plan(home, **slot):
    shape = {"name": "slot-0", "cpus": [0, 1], "memory_bytes": 4 * 2**30, "gpus": []}
    home.plan_file.parent.mkdir(parents=True, exist_ok=True)
    home.plan_file.write_text(json.dumps({"slots": [{**shape, **slot}]}))


@pytest.mark.parametrize("setup, args, message", [
    (lambda p, h: (p / "requirements.txt").write_text("numpy===\n"), [], "'numpy==='"),
    (lambda p, h: None, ["--pip", "x @ https://example.com/x.whl"], "direct reference"),
    (lambda p, h: (p / "requirements.txt").write_text("-r nothere.txt\n"), [], "nothere.txt"),
    (lambda p, h: write_plan(h), ["--ram", "64gb"], "no slot of this box can run it (slot-0 needs 64 GiB ram"),
    (lambda p, h: write_plan(h), ["--gpus", "1"], "needs 1 gpus, slot has 0"),
    (lambda p, h: write_plan(h), ["--cpus", "3"], "needs 3 cpus"),
    (lambda p, h: write_plan(h), ["--hdd", "1000tb"], "disk"),
    (lambda p, h: (p / ".applianceignore").write_text("train.py\n"), [], "left out by an ignore file"),
])
def test_refused_before_anything_is_sent(store_home, store, project, capsys, setup, args, message):
    setup(project, store_home)
    before = blobs(store)
    assert submit(store_home, project, *args, "train.py") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert queued(store_home) is None and blobs(store) == before


def test_a_missing_entry_file(store_home, project, capsys):
    assert submit(store_home, project, "tain.py") == 2
    assert "tain.py: no such file" in capsys.readouterr().err
    assert queued(store_home) is None


def test_a_request_a_slot_can_run_goes(store_home, project, capsys):
    write_plan(store_home)
    assert submit(store_home, project, "--ram", "1gb", "--cpus", "2", "train.py") == 0
    assert queued(store_home) is not None


# ---------------------------------------------------------------- which files

def packed_names(store, req) -> set:
    import io
    import tarfile

    ws = req.artifacts["workspace"]
    body = store.client().get_object(Bucket=ws.bucket, Key=ws.key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tf:
        return set(tf.getnames())


def test_ignore_files_are_honoured(store_home, store, project, capsys):
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref")
    (project / "data").mkdir()
    (project / "data" / "big.bin").write_bytes(b"x" * 100)
    (project / "runs").mkdir()
    (project / "runs" / "a.log").write_text("log")
    (project / "notes.md").write_text("notes")
    (project / ".gitignore").write_text("data/\nruns/\n")
    (project / ".applianceignore").write_text("*.md\n!runs/\n")
    assert submit(store_home, project, "train.py") == 0
    names = packed_names(store, queued(store_home))
    assert names == {".gitignore", ".applianceignore", "train.py", "unique.txt", "runs", "runs/a.log"}
    assert submit(store_home, project, "--no-gitignore", "train.py") == 0
    names = packed_names(store, queued(store_home))
    assert "data/big.bin" in names and "notes.md" not in names and ".git" not in names


def age(folder: Path, seconds: float = 60) -> None:
    """Files changed a moment ago are not trusted by their mtime: make these older."""
    t = time.time() - seconds
    for p in [folder, *folder.rglob("*")]:
        os.utime(p, (t, t))


def test_an_unchanged_folder_is_not_packed_again(store_home, store, project, capsys):
    age(project)
    assert submit(store_home, project, "train.py") == 0
    first = queued(store_home).artifacts["workspace"].key
    # same size, same mtime: the cache takes its word (as git's index does)
    f = project / "unique.txt"
    st = f.stat()
    f.write_text(f.read_text()[::-1])
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert submit(store_home, project, "train.py") == 0
    assert queued(store_home).artifacts["workspace"].key == first
    # the store lost it (gc): packed and sent again, the new content this time
    store.client().delete_object(Bucket=store.bucket, Key=first)
    assert submit(store_home, project, "train.py") == 0
    again = queued(store_home).artifacts["workspace"].key
    assert again != first and again in blobs(store)
    capsys.readouterr()


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_leaves_no_parts_in_the_store(store_home, store, project, tmp_path, presses):
    """An interrupted multipart upload is aborted: nothing is orphaned in the store, however
    often Ctrl-C is pressed."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    client = store.client()
    for _attempt in range(3):  # on a loaded box the upload may end before the signal lands: again
        with open(project / "big.bin", "wb") as fh:  # over the single-PUT size: multipart
            for _ in range(40):
                fh.write(os.urandom(2**20) * 4)
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(store_home.root),
                                 "submit", "--dir", str(project), "--no-freeze", "train.py"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                # as a terminal has it, even when this suite runs in the background
                                # (where a shell starts it with SIGINT ignored, and Python then keeps it so)
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        uploads = []
        while time.time() < deadline and proc.poll() is None and not uploads:
            uploads = client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
            time.sleep(0.02)
        assert uploads, "the upload ended before it could be interrupted"
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
        if proc.returncode == 0 and "queued" in err:  # it finished before the signal came
            assert queued(store_home) is not None  # (taken off the queue: the next try starts clean)
            continue
        break
    assert proc.returncode == 130, err
    assert "interrupted; nothing queued" in err
    assert client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    assert queued(store_home) is None


def test_a_big_folder_gets_a_hint(store_home, project, capsys, monkeypatch):
    from appliance import workspace_upload

    monkeypatch.setattr(workspace_upload, "WARN_BYTES", 1000)  # the threshold, not the 1 GiB folder
    (project / "data.bin").write_bytes(b"x" * 2000)
    assert submit(store_home, project, "train.py") == 0
    err = capsys.readouterr().err
    assert "the folder holds 2KiB" in err and ".applianceignore" in err
