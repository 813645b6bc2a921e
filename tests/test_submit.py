"""Packing a workspace, `appliance submit` against a real store, and `appliance queue`."""

from __future__ import annotations

import hashlib
import json
import os
import grp
import shutil
import stat
import subprocess
import sys
import uuid
import tarfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from appliance.actions.submit import DEFAULT_QUEUE
from appliance.freeze import freeze
from appliance.cli import main
from appliance.paths import Home
from appliance.queues.local import DEAD, LocalQueueSource, share_queue_tree
from appliance.studioml.request import parse_request
from appliance.studioml.safetar import safe_extract
from appliance.store.credentials import load_client_credentials
from appliance.workspace import pack_bytes, pack_directory, walk, workspace_key
from tests.realparts import full_filesystem


@pytest.fixture
def project(tmp_path) -> Path:
    p = tmp_path / "project"
    (p / "pkg" / "__pycache__").mkdir(parents=True)
    (p / ".git" / "objects").mkdir(parents=True)
    (p / ".venv" / "bin").mkdir(parents=True)
    (p / "train.py").write_text("print('hello')\n")
    (p / "pkg" / "__init__.py").write_text("")
    (p / "pkg" / "model.py").write_text("W = 1\n")
    (p / "pkg" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    (p / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (p / ".venv" / "bin" / "python").write_text("")
    (p / "data").mkdir()
    (p / "data" / "x.csv").write_text("a,b\n1,2\n")
    os.symlink("pkg/model.py", p / "model_link.py")
    return p


def names(tar_path: Path) -> list:
    with tarfile.open(tar_path) as tf:
        return tf.getnames()


# ---------------------------------------------------------------- workspace packing

def test_pack_layout_matches_the_client(project, tmp_path):
    tar, sha = pack_directory(project, out_dir=tmp_path)
    try:
        got = names(tar)
        assert got == ["data", "data/x.csv", "model_link.py", "pkg", "pkg/__init__.py",
                       "pkg/model.py", "train.py"]
        assert sha == hashlib.sha256(tar.read_bytes()).hexdigest()
        assert workspace_key(sha) == f"blobstore/{sha}.tar"
        # the studioml client: tf.add(join(path, name), arcname=name) for name in listdir(path)
        client_tar = tmp_path / "client.tar"
        with tarfile.open(client_tar, "w") as tf:
            for name in os.listdir(project):
                tf.add(project / name, arcname=name)
        skipped = (".git", ".venv", "__pycache__")
        assert set(got) == {n for n in names(client_tar)
                            if not any(s in n.split("/") for s in skipped)}
        with tarfile.open(tar) as tf:
            assert tf.getmember("model_link.py").issym()
            assert {m.uname for m in tf.getmembers()} == {""}
    finally:
        tar.unlink()


def test_pack_is_deterministic(project, tmp_path):
    a, sha_a = pack_directory(project, out_dir=tmp_path)
    b, sha_b = pack_directory(project, out_dir=tmp_path)
    assert sha_a == sha_b and a != b
    (project / "train.py").write_text("print('changed')\n")
    c, sha_c = pack_directory(project, out_dir=tmp_path)
    assert sha_c != sha_a


def test_pack_in_memory_is_the_same_tar(project, tmp_path):
    """A small workspace is packed in memory (workspace_upload): the same bytes, the same key."""
    tar, sha = pack_directory(project, out_dir=tmp_path)
    data, sha_mem = pack_bytes(walk(project))
    assert (data, sha_mem) == (tar.read_bytes(), sha)
    assert sha == hashlib.sha256(data).hexdigest()
    tar.unlink()


def test_pack_leaves_out_what_a_runner_would_refuse(project, tmp_path):
    os.symlink("/etc/passwd", project / "abs_link")
    os.symlink("../../outside", project / "pkg" / "rel_out")
    os.mkfifo(project / "pipe")
    told = []
    tar, _ = pack_directory(project, out_dir=tmp_path, on_skip=lambda r, why: told.append(r))
    assert sorted(told) == ["abs_link", "pipe", "pkg/rel_out"]
    assert not {"abs_link", "pipe", "pkg/rel_out"} & set(names(tar))
    dest = tmp_path / "unpacked"
    safe_extract(tar, dest, max_bytes=2**20)
    assert (dest / "train.py").read_text() == "print('hello')\n"
    assert (dest / "model_link.py").read_text() == "W = 1\n"


def test_pack_into_the_packed_folder(project):
    tar, _ = pack_directory(project, out_dir=project)
    assert tar.name not in names(tar)
    tar.unlink()


def test_pack_rejects_a_file(project):
    with pytest.raises(NotADirectoryError):
        pack_directory(project / "train.py")


# ---------------------------------------------------------------- submit, bad input first

@pytest.fixture
def home(tmp_path) -> Home:
    h = Home.at(tmp_path / "home")
    h.ensure()
    return h


def submit(home: Home, *args) -> int:
    return main(["--home", str(home.root), "submit", *args])


@pytest.mark.parametrize("args, message", [
    (["--queue", "rmq_gpu", "train.py"], "only local queues"),
    (["--queue", "local/../x", "train.py"], "only local queues"),
    (["missing.py"], "no such file"),
    (["../train.py"], "no such file"),
    (["--ram", "lots", "train.py"], "--ram"),
    (["--gpu-mem=-1gb", "train.py"], "--gpu-mem"),
    (["--max-duration", "soon", "train.py"], "--max-duration"),
    (["--env", "NOVALUE", "train.py"], "NAME=VALUE"),
    (["--python", "/nonexistent/python", "train.py"], "--python"),
])
def test_submit_bad_input(home, project, capsys, args, message):
    assert submit(home, "--dir", str(project), *args) == 2
    assert message in capsys.readouterr().err
    assert LocalQueueSource(home.queue_root, watch=False).depths() == {}


def test_submit_without_credentials(home, project, capsys):
    assert submit(home, "--dir", str(project), "--no-freeze", "train.py") == 2
    assert "store.json" in capsys.readouterr().err


def test_submit_with_store_down(home, project, capsys, store):
    shutil.copy(store.home.store_credentials, home.store_credentials)
    from tests.realparts import free_port
    home.config_file.write_text(f"[object_store]\nport = {free_port()}\n")
    assert submit(home, "--dir", str(project), "--no-freeze", "train.py") == 2
    assert "cannot reach the object store" in capsys.readouterr().err
    assert LocalQueueSource(home.queue_root, watch=False).depths() == {}


def test_freeze_of_a_real_interpreter():
    env, ver, _skipped = freeze(sys.executable)
    assert ver == "%d.%d" % sys.version_info[:2]
    assert any(line.lower().startswith("boto3==") for line in env)


def test_freeze_sends_what_pip_freeze_lists():
    """The package list is read without pip (fast), and is the same as `pip freeze --all`'s."""
    env, _ver, skipped = freeze(sys.executable)
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    pip_kept = [x for x in out if x and not x.startswith(("#", "-e ")) and " @ file:" not in x]
    assert sorted(env, key=str.lower) == sorted(pip_kept, key=str.lower)
    # this checkout is installed editable: it exists only here and is not sent
    assert any(line.startswith("-e ") for line in skipped)


# ---------------------------------------------------------------- submit against the store

@pytest.fixture
def store_home(home, store) -> Home:
    """An appliance home that uses the session's real store."""
    shutil.copy(store.home.store_credentials, home.store_credentials)
    port = urlsplit(store.endpoint_url).port
    home.config_file.write_text(
        f'[object_store]\nport = {port}\nbucket = "{store.bucket}"\n')
    return home


def test_submit_end_to_end(store_home, project, store, capsys, tmp_path):
    rc = submit(store_home, "--dir", str(project), "--no-freeze", "--cpus", "2", "--ram", "1gb",
                "--lifetime", "30m", "--max-duration", "1h", "--env", "A=1", "--env",
                "PATH=%PATH%:./bin", "--pip", "numpy", "train.py", "--lr", "0.1", "--flag")
    out = capsys.readouterr()
    assert rc == 0, out.err
    key = out.out.strip()
    assert key and "/" not in key

    src = LocalQueueSource(store_home.queue_root, runner_id="test")
    assert src.depths() == {DEFAULT_QUEUE: 1}
    msg = src.claim(DEFAULT_QUEUE)
    req = parse_request(msg.body)
    assert req.key == key and req.filename == "train.py"
    assert req.args == ("--lr", "0.1", "--flag")
    assert req.resources.cpus == 2 and req.resources.ram_bytes == 2**30
    assert (req.lifetime_s, req.max_duration_s, req.save_every_s) == (1800, 3600, 180)
    assert req.env == {"A": "1", "PATH": "%PATH%:./bin"}
    assert req.pip == ("numpy",) and req.pythonenv == ()
    raw = req.raw
    fixture = json.loads((Path(__file__).parent / "fixtures" / "studioml-request.json")
                         .read_text())
    assert set(raw["experiment"]["artifacts"]) == set(fixture["experiment"]["artifacts"])
    assert set(raw["experiment"]) == set(fixture["experiment"])
    assert set(raw["config"]) >= set(fixture["config"]) - {"cloud"}

    ws = req.artifacts["workspace"]
    assert ws.endpoint_url == store.endpoint_url and ws.bucket == store.bucket
    assert ws.key.startswith("blobstore/") and not ws.mutable
    assert req.artifacts["output"].key == f"experiments/{key}/output.tar"
    client = load_client_credentials(store_home)  # the scoped identity, never the admin one
    assert (ws.access_key, ws.secret_key) == (client.access_key, client.secret_key)

    got = tmp_path / "ws.tar"
    store.client().download_file(ws.bucket, ws.key, str(got))
    assert ws.key == f"blobstore/{hashlib.sha256(got.read_bytes()).hexdigest()}.tar"
    dest = tmp_path / "workspace"
    safe_extract(got, dest, max_bytes=2**20)
    assert (dest / "train.py").read_text() == "print('hello')\n"
    assert not (dest / ".git").exists() and not (dest / ".venv").exists()
    src.ack(msg)
    src.close()


def test_root_submit_follows_a_changed_config(store_home, project, store, capsys):
    """Root's submit remembers where the store is (HOME/run/submit-store.json), but never past a
    change of appliance.toml, even one that keeps its size and mtime."""
    from tests.realparts import free_port

    config = store_home.config_file
    old = os.stat(config).st_mtime_ns - 10**10  # settled: older than a few seconds
    os.utime(config, ns=(old, old))
    assert submit(store_home, "--dir", str(project), "--no-freeze", "train.py") == 0
    assert (store_home.run_dir / "submit-store.json").exists()
    assert submit(store_home, "--dir", str(project), "--no-freeze", "train.py") == 0  # from there
    port = str(urlsplit(store.endpoint_url).port)
    moved = str(free_port())
    while len(moved) != len(port):
        moved = str(free_port())
    config.write_text(config.read_text().replace(f"port = {port}", f"port = {moved}"))
    os.utime(config, ns=(old, old))
    capsys.readouterr()
    assert submit(store_home, "--dir", str(project), "--no-freeze", "train.py") == 2
    assert f"cannot reach the object store at http://127.0.0.1:{moved}" in capsys.readouterr().err


def test_a_plain_submit_imports_only_what_it_uses(store_home, project):
    """A submit is timed from the user's shell, most of it imports: none of boto3, http.client,
    the config schema (its place remembered), the cgroup package, subprocess or the freeze helper."""
    config = store_home.config_file
    old = os.stat(config).st_mtime_ns - 10**10
    os.utime(config, ns=(old, old))
    script = ("import sys\nfrom appliance.cli import main\nrc = main(sys.argv[1:])\n"
              "print(' '.join(sorted(sys.modules)))\nsys.exit(rc)\n")
    argv = [sys.executable, "-c", script, "--home", str(store_home.root), "submit", "--no-freeze",
            "--dir", str(project), "train.py"]
    for _ in range(2):  # the second finds the store's place remembered
        done = subprocess.run(argv, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "appliance.workspace_upload" in loaded  # it did submit
    heavy = {"boto3", "botocore", "http.client", "appliance.config", "tomllib", "appliance.slot.cgroup",
             "subprocess", "appliance.freeze", "appliance.api.protocol", "appliance.studioml.environment",
             "tempfile"}
    assert loaded & heavy == set()


def test_submit_on_a_full_disk_is_one_line_and_leaves_nothing(store_home, project, capsys):
    assert submit(store_home, "--dir", str(project), "--no-freeze", "train.py") == 0  # the store has it
    capsys.readouterr()
    with full_filesystem(store_home.queue_root, "256k"):
        rc = submit(store_home, "--dir", str(project), "--no-freeze", "train.py")
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert "no space left on device" in err and "Traceback" not in err
        assert not list(store_home.queue_root.rglob(".*.tmp"))


def test_same_tree_same_workspace(store_home, project, capsys, monkeypatch):
    monkeypatch.chdir(project)  # --dir defaults to the current folder
    assert submit(store_home, "--no-freeze", "--queue", "local_twice", "train.py") == 0
    assert submit(store_home, "--no-freeze", "--queue", "local_twice", "train.py") == 0
    keys = capsys.readouterr().out.split()
    assert len(set(keys)) == 2
    src = LocalQueueSource(store_home.queue_root, watch=False)
    reqs = [parse_request(src.claim("local_twice").body) for _ in range(2)]
    assert reqs[0].artifacts["workspace"].key == reqs[1].artifacts["workspace"].key
    assert {r.key for r in reqs} == set(keys)


def test_unchanged_folder_is_uploaded_once(store_home, project, store, capsys):
    (project / "unique.txt").write_text(uuid.uuid4().hex)  # a workspace no other test sends
    assert submit(store_home, "--dir", str(project), "--no-freeze", "train.py") == 0
    src = LocalQueueSource(store_home.queue_root, watch=False)
    ws = parse_request(src.claim(DEFAULT_QUEUE).body).artifacts["workspace"]
    # mark the stored copy: a second upload would replace it
    store.client().put_object(Bucket=ws.bucket, Key=ws.key, Body=b"the copy already stored")
    assert submit(store_home, "--dir", str(project), "--no-freeze", "train.py") == 0
    again = parse_request(src.claim(DEFAULT_QUEUE).body).artifacts["workspace"]
    assert again.key == ws.key
    body = store.client().get_object(Bucket=ws.bucket, Key=ws.key)["Body"].read()
    assert body == b"the copy already stored"
    capsys.readouterr()


def test_submitted_message_is_its_senders_alone(store_home, project, capsys):
    from tests.realparts import need

    need(os.geteuid() == 0, "root (to hand the queue to a group)")
    group = grp.getgrnam("daemon")  # stands in for `appliance`
    share_queue_tree(store_home.studioml_home, group=group.gr_name)
    old_umask = os.umask(0o022)  # a usual umask would give 0644
    try:
        assert submit(store_home, "--dir", str(project), "--no-freeze", "train.py") == 0
    finally:
        os.umask(old_umask)
    [msg] = [p for p in (store_home.queue_root / DEFAULT_QUEUE).iterdir() if p.name != "lock.lock"]
    st = msg.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o600, group.gr_gid)  # it holds a store key
    capsys.readouterr()


def test_submit_with_freeze(store_home, project, capsys):
    assert submit(store_home, "--dir", str(project), "--python", sys.executable, "--freeze",
                  "--queue", "local_frozen", "train.py") == 0
    src = LocalQueueSource(store_home.queue_root, watch=False)
    req = parse_request(src.claim("local_frozen").body)
    assert req.pythonver == "%d.%d" % sys.version_info[:2]
    assert any(p.lower().startswith("boto3==") for p in req.pythonenv)


# ---------------------------------------------------------------- appliance queue

def queue_cli(home: Home, *args) -> int:
    return main(["--home", str(home.root), "queue", *args])


def test_queue_ls_and_dead(home, capsys):
    assert queue_cli(home) == 0
    assert "no queues yet" in capsys.readouterr().out
    src = LocalQueueSource(home.queue_root, runner_id="t")
    for _ in range(3):
        src.enqueue("local_a", b"{}")
    src.enqueue("local_b", b"{}")
    src.claim("local_a")
    bad = src.claim("local_b")
    src.dead_letter(bad, "message: not JSON")

    assert queue_cli(home, "ls", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {"source": "local", "queue": "local_a", "waiting": 2, "running": 1, "dead": 0, "problem": "",
         "refused": 0, "cannot_run": []},
        {"source": "local", "queue": "local_b", "waiting": 0, "running": 0, "dead": 1, "problem": "",
         "refused": 0, "cannot_run": []},
    ]
    assert queue_cli(home, "ls") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SOURCE", "QUEUE", "WAITING", "RUNNING", "DEAD", "CANNOT", "RUN", "HERE"]
    assert lines[1].split() == ["local", "local_a", "2", "1", "0", "0"]

    assert queue_cli(home, "dead") == 0
    assert capsys.readouterr().out.strip() == f"local_b/{bad.message_id}: message: not JSON"
    src.close()


def test_queue_dead_survives_whatever_a_submitter_sent(home, capsys):
    src = LocalQueueSource(home.queue_root, runner_id="t")
    deep = b'{"experiment": {"key": ' + b"[" * 200000 + b"]" * 200000 + b"}}"
    escape = json.dumps({"experiment": {"key": "k\x1b]0;owned\x07"}}).encode()
    for body in (deep, escape):
        src.enqueue("local_a", body)
        src.dead_letter(src.claim("local_a"), "message: not a request")
    src.close()
    assert queue_cli(home, "dead") == 0
    out = capsys.readouterr().out
    assert out.count("message: not a request") == 2 and "\x1b" not in out
    assert queue_cli(home, "dead", "--json") == 0
    assert [row["experiment"] for row in json.loads(capsys.readouterr().out)] == [None, None]


@pytest.mark.parametrize("ttl, kept", [("1d", False), ("0", True)])
def test_queue_dead_drops_expired_dead_letters(home, capsys, ttl, kept):
    home.config_file.write_text(f'[queues]\ndead_ttl = "{ttl}"\n')
    src = LocalQueueSource(home.queue_root, runner_id="t", dead_ttl_s=0)
    src.enqueue("local_a", b"{}")
    bad = src.claim("local_a")
    src.dead_letter(bad, "poison")
    src.close()
    t = os.stat(home.queue_root).st_mtime - 2 * 86400
    for f in (home.queue_root / DEAD / "local_a").iterdir():
        os.utime(f, (t, t))
    assert queue_cli(home, "dead") == 0
    out = capsys.readouterr().out
    assert (bad.message_id in out) == kept
    assert ("no dead-lettered messages" in out) == (not kept)


def as_nobody(fn, *args) -> tuple:
    """Run fn(*args) in a forked child that is user nobody (no groups); (exit code, stderr)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        rc = 99
        try:
            os.close(r)
            sys.stderr = open(w, "w", buffering=1)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            rc = fn(*args)
        finally:
            sys.stderr.flush()
            os._exit(rc)
    os.close(w)
    with open(r) as fh:
        err = fh.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


def test_queue_tells_a_non_member_how_to_get_in():
    from tests.realparts import need

    need(os.geteuid() == 0, "root (to act as another user)")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="queue-perm-"))
    try:
        base.chmod(0o755)
        home = Home.at(base / "home")
        home.ensure()
        share_queue_tree(home.studioml_home, group="daemon")  # stands in for `appliance`
        rc, err = as_nobody(queue_cli, home, "ls")
        assert rc == 2, err
        assert "usermod -aG" in err and str(home.queue_root) in err
    finally:
        shutil.rmtree(base)
