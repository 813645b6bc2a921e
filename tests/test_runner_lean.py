"""A runner carries only what its jobs need: boto3, pika, pynvml, docker, OpenSSL (ssl, hashlib's
_hashlib: ~4 MB resident) and the email package stay unloaded in a runner of a CPU slot that
serves the local queue, even after it ran a job through the real store (whose small requests go
through appliance/store/lite.py); idle, it has not loaded packaging, tomlkit, jinja2,
prometheus_client or watchdog either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from appliance.store import lite
from tests.test_runner_loop import HELLO, REPO, home, output_of, request, submit  # noqa: F401

HEAVY = ("boto3", "botocore", "s3transfer", "pika", "pynvml", "docker", "ssl", "_ssl", "_hashlib", "email")
IDLE_TOO = ("packaging", "tomlkit", "jinja2", "prometheus_client", "watchdog")  # nor these, while idle
# each ~0.2-0.3 MB of every slot, for good, for one call: the command line, a message id, uv's path;
# inspect with ast and dis (~1.2 MB) for a dataclass's docstring (runner/__main__.py)
SMALL = ("argparse", "uuid", "sysconfig", "inspect", "ast", "dis")

PROBE = """
import json, sys
from appliance.runner.__main__ import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(%r))}))
""" % (HEAVY + IDLE_TOO + SMALL,)


def run_runner(home, slot: str, own_python: bool = True) -> dict:
    """The real runner's main, until its queues are empty; what it had loaded at the end.
    own_python: jobs run with this interpreter (runner.python), else in a venv it builds."""
    home.config_file.write_text(f'[runner]\npython = "{sys.executable}"\n' if own_python else "")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "AWS_"))}
    done = subprocess.run([sys.executable, "-c", PROBE, "--home", str(home.root), "--slot", slot,
                           "--exit-when-idle"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_idle_runner_loads_no_store_queue_or_gpu_library(home):
    got = run_runner(home, "slot-lean")
    assert got == {"rc": 0, "loaded": []}


def test_a_job_runs_and_uploads_without_boto3_in_the_runner(store, home):
    key, body = request(store, HELLO, args=["--lr", "0.1"])
    submit(home, body)
    got = run_runner(home, "slot-lean")
    assert got["rc"] == 0 and not set(got["loaded"]) & set(HEAVY + SMALL)
    assert "hello from the workload ['--lr', '0.1']" in output_of(store, key)


def test_a_job_without_requirements_that_builds_its_venv_leaves_no_packaging_behind(store, home):
    key, body = request(store, HELLO, args=["--lr", "0.2"], pythonenv=())  # requirements would need it
    submit(home, body)
    got = run_runner(home, "slot-lean", own_python=False)
    assert got["rc"] == 0 and not set(got["loaded"]) & set(HEAVY + SMALL + ("packaging",))
    assert "hello from the workload ['--lr', '0.2']" in output_of(store, key)


def test_the_quick_client_does_only_what_the_store_answers_as_expected(store):
    c = lite.Client(store.endpoint_url, store.access_key, store.secret_key)
    prefix = f"lite-{uuid.uuid4().hex[:8]}/"
    c.put(store.bucket, prefix + "a b+c.txt", b"hello")
    assert c.get(store.bucket, prefix + "a b+c.txt", 100) == b"hello"
    assert c.head(store.bucket, prefix + "a b+c.txt")["content-length"] == "5"
    assert c.list_keys(store.bucket, prefix) == {prefix + "a b+c.txt"}
    assert c.list_keys(store.bucket, prefix + "nothing/") == set()
    with pytest.raises(lite.Unexpected):  # larger than asked for: boto3 streams it instead
        c.get(store.bucket, prefix + "a b+c.txt", 4)
    with pytest.raises(lite.Unexpected):  # missing: boto3 says so, with its words
        c.head(store.bucket, prefix + "missing")
    assert c.get_if_there(store.bucket, prefix + "missing", 100) is None  # unless asked for a 404's NoSuchKey
    assert c.get_if_there(f"no-such-bucket-{uuid.uuid4().hex[:8]}", "k", 100) is None
    assert c.get_if_there(store.bucket, prefix + "a b+c.txt", 100) == b"hello"
    assert c.get(store.bucket, prefix + "a b+c.txt", 100) == b"hello"  # the connection is still good
    c.put(store.bucket, prefix + "gone", b"x")
    c.delete(store.bucket, prefix + "gone")
    assert c.list_keys(store.bucket, prefix) == {prefix + "a b+c.txt"}
    wrong = lite.Client(store.endpoint_url, store.access_key, "not-the-secret")
    with pytest.raises(lite.Unexpected):
        wrong.get(store.bucket, prefix + "a b+c.txt", 100)
    with pytest.raises(lite.Unexpected):
        lite.Client(store.endpoint_url, "", "")  # unsigned requests are boto3's
    with pytest.raises(lite.Unexpected):
        lite.Client(store.endpoint_url + "/path", store.access_key, store.secret_key)
    down = lite.Client("http://127.0.0.1:9", store.access_key, store.secret_key, timeout=2)
    with pytest.raises(lite.Refused):
        down.head(store.bucket, prefix + "a b+c.txt")


def test_the_boxs_own_store_is_reached_at_its_socket_and_over_tcp_once_that_is_gone(store, tmp_path, monkeypatch):
    from appliance.store.server import store_run_dir
    monkeypatch.setattr(lite, "_BESIDE", {})
    key = f"lite-{uuid.uuid4().hex[:8]}/beside"
    # nothing listens on port 9: what answers is the store, at its unix socket
    lite.reach_through("http://127.0.0.1:9", str(store_run_dir(store.home) / "s3.sock"))
    beside = lite.Client("http://127.0.0.1:9", store.access_key, store.secret_key, timeout=5)
    beside.put(store.bucket, key, b"through the socket")
    assert beside.get(store.bucket, key, 100) == b"through the socket"
    # a socket that is not there (the store restarting): the same request over TCP
    lite.reach_through(store.endpoint_url, str(tmp_path / "gone.sock"))
    tcp = lite.Client(store.endpoint_url, store.access_key, store.secret_key, timeout=5)
    assert tcp.get(store.bucket, key, 100) == b"through the socket"


def test_the_quick_client_sends_again_when_its_kept_connection_was_closed():
    import socket
    import threading
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def serve():  # each connection: one answer (kept open, as HTTP/1.1 says), then closed by the server
        while True:
            conn, _ = listener.accept()
            connections.append(conn)
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                conn.shutdown(socket.SHUT_RDWR)
    threading.Thread(target=serve, daemon=True).start()
    c = lite.Client(f"http://127.0.0.1:{listener.getsockname()[1]}", "key", "secret", timeout=5)
    assert [c.head_status("b", "k") for _ in range(3)] == [200, 200, 200]
    assert len(connections) == 3


@pytest.mark.parametrize("argv, home, slot, idle, verbose", [
    (["--home", "/h", "--slot", "slot-1"], "/h", "slot-1", False, False),  # as supervisord starts it
    (["--home=/h", "--slot=s", "--exit-when-idle", "-v"], "/h", "s", True, True),
    (["--verbose", "--home", "/h"], "/h", "dev", False, True),
])
def test_the_runners_command_line(argv, home, slot, idle, verbose, monkeypatch):
    from appliance.runner.__main__ import parse

    monkeypatch.delenv("APPLIANCE_SLOT", raising=False)
    args = parse(argv)
    assert (args.home, args.slot, args.exit_when_idle, args.verbose) == (home, slot, idle, verbose)


@pytest.mark.parametrize("argv, code, says", [
    (["--help"], 0, "--exit-when-idle  stop when no queue has work"),
    (["--bogus"], 2, "error: option --bogus not recognized"),
    (["--slot"], 2, "error: option --slot requires argument"),
    (["--slot", "s", "stray"], 2, "error: unrecognized arguments: stray"),
    (["--home", "{missing}", "--exit-when-idle"], 2, "there is no appliance home at {missing}"),
])
def test_the_runners_help_and_its_errors(argv, code, says, tmp_path):
    missing = tmp_path / "no-such-home"  # a typo'd --home
    argv = [a.format(missing=missing) for a in argv]
    done = subprocess.run([sys.executable, "-m", "appliance.runner", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == code and says.format(missing=missing) in done.stdout + done.stderr
    assert not missing.exists()  # not made
