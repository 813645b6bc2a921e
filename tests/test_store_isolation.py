"""The bundled store as another local user sees it: only the S3 port answers, and only signed
requests; SeaweedFS's master, volume and filer (HTTP and gRPC), its unix sockets and its data
files are out of reach. A real store (`weed server` in its sandbox); the probes run as uid 65534."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from appliance.store.server import seaweed_ports, store_run_dir
from tests.realparts import need
from tests.store_fixtures import start_store, stop_store

NOBODY = 65534
# stdlib only: /root (where the test interpreter lives) is closed to uid 65534
PLAIN_PYTHON = "/usr/bin/python3"

PROBE = r'''
import http.client, json, os, socket, sys
args = json.loads(sys.argv[1])
out = {}

def http_probe(name, port, method, path, body=None, headers=None, unix=None):
    try:
        if unix:
            conn = http.client.HTTPConnection("localhost", timeout=5)
            conn.sock = socket.socket(socket.AF_UNIX)
            conn.sock.settimeout(5)
            conn.sock.connect(unix)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        out[name] = f"answered {r.status} {r.read(200)!r}"
    except ConnectionRefusedError:
        out[name] = "refused"
    except PermissionError:
        out[name] = "denied"
    except OSError as e:
        out[name] = f"error {e!r}"

m, v, f = args["master"], args["volume"], args["filer"]
fid = "1,01637037d6"
form = b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nevil\r\n--B--\r\n"
upload = {"Content-Type": "multipart/form-data; boundary=B"}
for path in ("/dir/assign", "/dir/lookup?volumeId=1", "/vol/grow?count=1", "/col/delete?collection=" + args["bucket"],
             "/cluster/status", "/dir/status", "/vol/status", "/" + fid):
    http_probe(f"master GET {path}", m, "GET", path)
http_probe("volume GET /status", v, "GET", "/status")
http_probe(f"volume GET /{fid}", v, "GET", "/" + fid)
http_probe(f"volume POST /{fid}", v, "POST", "/" + fid, form, upload)
http_probe(f"volume DELETE /{fid}", v, "DELETE", "/" + fid)
for name, sock in (("tcp", None), ("unix", args["filer_socket"])):
    bucket_dir = "/buckets/" + args["bucket"] + "/"
    http_probe(f"filer({name}) GET listing", f, "GET", bucket_dir, headers={"Accept": "application/json"}, unix=sock)
    http_probe(f"filer({name}) GET object", f, "GET", bucket_dir + args["key"], unix=sock)
    http_probe(f"filer({name}) PUT", f, "POST", bucket_dir + "evil.txt", form, upload, unix=sock)
    http_probe(f"filer({name}) DELETE", f, "DELETE", bucket_dir + args["key"], unix=sock)
http_probe("s3(unix) unsigned GET", 0, "GET", "/" + args["bucket"] + "/" + args["key"], unix=args["s3_socket"])
for port in args["grpc"]:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        out[f"grpc {port}"] = "connected"
    except ConnectionRefusedError:
        out[f"grpc {port}"] = "refused"
for path in (args["data"], os.path.join(args["data"], ".mini_sse_kek")):
    try:
        out[f"read {path}"] = f"read {len(os.listdir(path) if os.path.isdir(path) else open(path).read())}"
    except PermissionError:
        out[f"read {path}"] = "denied"
http_probe("s3 unsigned GET object", args["s3"], "GET", "/" + args["bucket"] + "/" + args["key"])
http_probe("s3 unsigned listing", args["s3"], "GET", "/" + args["bucket"] + "?list-type=2")
http_probe("s3 unsigned PUT", args["s3"], "PUT", "/" + args["bucket"] + "/evil.txt", b"evil")
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def open_store():
    """A store whose home any user may walk into (the session's lives under pytest's 0700 tmp)."""
    root = Path(tempfile.mkdtemp(prefix="appliance-store-iso-"))
    root.chmod(0o755)
    running = start_store(root / "home")
    yield running
    stop_store(running)
    shutil.rmtree(root, ignore_errors=True)


def as_nobody(args: dict) -> dict:
    need(os.geteuid() == 0 and os.access(PLAIN_PYTHON, os.X_OK), f"root and {PLAIN_PYTHON} to probe as uid 65534")
    p = subprocess.run([PLAIN_PYTHON, "-c", PROBE, json.dumps(args)], user=NOBODY, group=NOBODY, extra_groups=[],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_another_user_reaches_nothing_but_signed_s3(open_store):
    store = open_store
    key = f"precious/{uuid.uuid4()}"
    store.client().put_object(Bucket=store.bucket, Key=key, Body=b"precious")
    port = urlsplit(store.endpoint_url).port
    ports = seaweed_ports(port)
    private = store_run_dir(store.home)
    got = as_nobody({
        **ports, "grpc": [p + 10000 for p in ports.values()], "bucket": store.bucket, "key": key,
        "filer_socket": str(private / "filer.sock"), "s3_socket": str(private / "s3.sock"),
        "data": str(store.home.store_data)})

    s3_probes = {k: v for k, v in got.items() if k.startswith("s3 unsigned")}
    others = {k: v for k, v in got.items() if k not in s3_probes}
    reached = {k: v for k, v in others.items() if v not in ("refused", "denied")}
    assert not reached, f"another user reached the store's insides: {json.dumps(reached, indent=1)}"
    assert all(v.startswith("answered 403") for v in s3_probes.values()), s3_probes

    # the object survived every attempt, and signed S3 still works (admin and client identity)
    assert store.client().get_object(Bucket=store.bucket, Key=key)["Body"].read() == b"precious"
    scoped = store.scoped_client()
    scoped.put_object(Bucket=store.bucket, Key=key + ".2", Body=b"two")
    assert scoped.get_object(Bucket=store.bucket, Key=key + ".2")["Body"].read() == b"two"
    names = [o["Key"] for o in scoped.list_objects_v2(Bucket=store.bucket, Prefix="precious/")["Contents"]]
    assert key in names and "evil.txt" not in names


def test_the_store_files_are_its_owners_alone(open_store):
    store = open_store
    store.client().put_object(Bucket=store.bucket, Key="mode-check", Body=b"x" * 1000)
    private = store_run_dir(store.home)
    for top in (store.home.store_data, private):
        assert stat.S_IMODE(top.stat().st_mode) == 0o700, top  # the guard: nobody else gets in
        # SeaweedFS 4.x fchmods each new volume's small .vif (volume metadata, no data) to 0644
        # whatever the umask; inside the 0700 folder no one else can reach it, and the next
        # start closes it too
        loose = [str(p) for p in top.rglob("*")
                 if not p.is_symlink() and stat.S_IMODE(p.lstat().st_mode) & 0o077 and p.suffix != ".vif"]
        assert not loose, f"readable by others: {loose[:10]}"
    # its log goes to its wrapper's stderr (logs/store.log) only: no log files of its own, in /tmp or elsewhere
    weed = int(open(f"/proc/{store.process.pid}/task/{store.process.pid}/children").read().split()[0])
    assert b"-logtostderr" in open(f"/proc/{weed}/cmdline", "rb").read().split(b"\0")
    assert not [p for p in Path("/tmp").glob(f"weed.*.{weed}")] + [p for p in private.glob(f"weed.*.{weed}")]


def test_loose_files_from_an_older_store_are_closed_at_start(tmp_path):
    """Data written by an earlier version (mode 0644, folder 0755) is locked down when the store starts."""
    from appliance.store.sandbox import make_private

    data = tmp_path / "store"
    (data / "vol").mkdir(parents=True)
    (data / "vol" / "1.dat").write_bytes(b"x")
    for p, mode in ((data, 0o755), (data / "vol", 0o755), (data / "vol" / "1.dat", 0o644)):
        p.chmod(mode)
    make_private(str(data))
    assert [stat.S_IMODE(p.stat().st_mode) for p in (data, data / "vol", data / "vol" / "1.dat")] == \
        [0o700, 0o700, 0o600]


def test_up_runs_the_store_in_its_own_network_and_hands_out_the_client_identity(appliance_home):
    """Under supervisord, as `appliance up` runs it: the store's processes live in a network
    namespace of their own, their umask is 077, and what `up` gives users is the client identity."""
    from appliance import supervisor
    from appliance.store.client import s3_client
    from appliance.store.credentials import STUDIOML_META_BUCKET, load_client_credentials, load_credentials

    appliance_home.cli("up", "--timeout", "90")
    home = appliance_home.home
    sandbox = supervisor.processes(home)["store"].pid
    weed = int(Path(f"/proc/{sandbox}/task/{sandbox}/children").read_text().split()[0])
    assert "weed" in Path(f"/proc/{weed}/cmdline").read_text()
    assert os.readlink(f"/proc/{weed}/ns/net") != os.readlink("/proc/self/ns/net")
    umask = [line for line in Path(f"/proc/{weed}/status").read_text().splitlines() if line.startswith("Umask:")]
    assert umask == ["Umask:\t0077"]
    assert "umask=077" in home.supervisord_conf.read_text()

    admin, client = load_credentials(home), load_client_credentials(home)
    env = (home.secrets_dir / "s3.env").read_text()
    assert client.access_key in env and admin.access_key not in env and admin.secret_key not in env
    endpoint = appliance_home.status()["store"]["endpoint"]
    scoped = s3_client(endpoint, client.access_key, client.secret_key, attempts=1)
    assert {"appliance", STUDIOML_META_BUCKET} <= {b["Name"] for b in scoped.list_buckets()["Buckets"]}
    scoped.put_object(Bucket=STUDIOML_META_BUCKET, Key="experiments/k", Body=b"{}")


def test_the_stores_unix_sockets_are_named_after_its_own_ports(store):
    """SeaweedFS serves every gRPC port on /tmp/seaweedfs-NAME-grpc-PORT.sock, which all the
    stores of a host share: each of ours must name a port of its own, or one store's parts talk
    to another's (`weed mini`'s maintenance worker reached another store's admin server, and
    then retried its master forever)."""
    import re

    from tests.realparts import wait_for

    log = store.home.logs_dir / "store.log"
    wait_for("the filer's socket", lambda: "seaweedfs-filer-grpc-" in log.read_text(), timeout=120)
    own = {p + 10000 for p in seaweed_ports(urlsplit(store.endpoint_url).port).values()}
    named = {int(n) for n in re.findall(r"/tmp/seaweedfs-[a-z0-9]+-grpc-(\d+)\.sock", log.read_text())}
    assert named and named <= own, f"sockets named after ports not its own: {sorted(named - own)}"
