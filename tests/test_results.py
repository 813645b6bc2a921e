"""`appliance results` (and `logs`) read only from the appliance's own store, whatever endpoint
a request named: a request is anyone's to write, and the appliance's keys go with each read.
A real store, and a second local HTTP listener standing in for an attacker's endpoint."""

from __future__ import annotations

import io
import tarfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from appliance.cli import main
from appliance.runner.status import record_experiment


class Recorder(BaseHTTPRequestHandler):
    seen: list = []

    def _answer(self):
        self.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PUT = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def listener():
    """An HTTP endpoint that only records who called it."""
    seen = []
    handler = type("Handler", (Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()



def output_tar(text: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = text.encode()
        info = tarfile.TarInfo("output")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def record(home, key, endpoint, bucket, object_key):
    """What a runner records for a request that named `endpoint` for its output."""
    record_experiment(home, key, {"experiment": key, "artifacts": {
        "output": {"endpoint_url": endpoint, "bucket": bucket, "key": object_key, "mutable": True}}})


def test_results_and_logs_never_follow_a_recorded_endpoint(store_home, store, listener, tmp_path, capsys):
    url, seen = listener
    key = f"exp_{uuid.uuid4().hex[:8]}"
    store.client().put_object(Bucket=store.bucket, Key=f"experiments/{key}/output.tar",
                              Body=output_tar("from the appliance's store\n"))
    record(store_home, key, url, store.bucket, f"experiments/{key}/output.tar")

    dest = tmp_path / "res"
    assert main(["--home", str(store_home.root), "results", key, "--dest", str(dest)]) == 0
    assert (dest / "output" / "output").read_text() == "from the appliance's store\n"
    assert main(["--home", str(store_home.root), "logs", key]) == 0
    assert "from the appliance's store" in capsys.readouterr().out
    assert seen == [], f"the recorded endpoint was contacted: {seen}"

    # only when told so, explicitly
    assert main(["--home", str(store_home.root), "results", key, "--dest", str(tmp_path / "other"),
                 "--endpoint", url]) == 1
    assert seen


def test_a_record_naming_the_store_itself_keeps_its_key(store_home, store, listener, tmp_path):
    """A StudioML client may lay its keys out otherwise: a record that names the appliance's own
    store is followed to its key."""
    key = f"exp_{uuid.uuid4().hex[:8]}"
    store.client().put_object(Bucket=store.bucket, Key=f"elsewhere/{key}/out.tar", Body=output_tar("moved\n"))
    record(store_home, key, store.endpoint_url, store.bucket, f"elsewhere/{key}/out.tar")
    dest = tmp_path / "res"
    assert main(["--home", str(store_home.root), "results", key, "--dest", str(dest)]) == 0
    assert (dest / "output" / "output").read_text() == "moved\n"


def test_results_endpoint_must_be_a_url(store_home, capsys):
    assert main(["--home", str(store_home.root), "results", "k", "--endpoint", "ftp://x"]) == 2
    assert "--endpoint" in capsys.readouterr().err
