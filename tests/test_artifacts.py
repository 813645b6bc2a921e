"""artifacts.py and cache.py against a real SeaweedFS: fetch, cache, upload, bad inputs."""

from __future__ import annotations

import io
import os
import tarfile
import uuid

import pytest

from appliance.studioml import transfer as arts
from appliance.studioml import packing
from appliance.studioml.transfer import RetryPolicy
from appliance.studioml.uploader import Uploader
from appliance.runner.cache import ArtifactCache
from appliance.studioml.request import Artifact
from tests.realparts import free_port


def make_tar(files: dict[str, bytes], prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def artifact(store, name, key, mutable=False, unpack=True, secret=None, endpoint=None):
    return Artifact(name=name, key=key, bucket=store.bucket,
                    endpoint_url=endpoint or store.endpoint_url, mutable=mutable, unpack=unpack,
                    access_key=store.access_key,
                    secret_key=store.secret_key if secret is None else secret,
                    region="us-east-1", session_token=None)


class Sleeps(list):
    def __call__(self, s):
        self.append(s)


def policy(attempts=3) -> tuple[RetryPolicy, Sleeps]:
    sleeps = Sleeps()
    return RetryPolicy(attempts=attempts, first_delay_s=0.5, max_delay_s=1, sleep=sleeps), sleeps


def put(store, key, data: bytes):
    store.client().put_object(Bucket=store.bucket, Key=key, Body=data)


# ------------------------------------------------------------------ the cache, no store

def test_cache_is_byte_bounded_lru(tmp_path):
    cache = ArtifactCache(tmp_path / "c", max_bytes=250)
    for key in ("a", "b"):
        with cache.insert(key) as tmp:
            tmp.write_bytes(b"x" * 100)
    os.utime(cache._path("a"), (1, 1))  # a was used long ago ...
    os.utime(cache._path("b"), (2, 2))
    cache.open("a").close()  # ... and just now: b is the least recently used
    with cache.insert("c") as tmp:
        tmp.write_bytes(b"y" * 100)
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.size() <= 250


def test_cache_keeps_nothing_bigger_than_itself_and_nothing_failed(tmp_path):
    cache = ArtifactCache(tmp_path / "c", max_bytes=10)
    f = cache.fill("big", lambda p: p.write_bytes(b"z" * 100))
    assert f.read() == b"z" * 100  # the caller still gets it
    f.close()
    assert "big" not in cache
    with pytest.raises(RuntimeError):
        with cache.insert("broken") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("download died")
    assert "broken" not in cache
    assert list((tmp_path / "c" / "tmp").iterdir()) == []


def test_an_open_entry_survives_eviction_by_another_runner(tmp_path):
    one = ArtifactCache(tmp_path / "c", max_bytes=150)
    two = ArtifactCache(tmp_path / "c", max_bytes=150)
    with one.insert("k") as tmp:
        tmp.write_bytes(b"k" * 100)
    f = one.open("k")
    with two.insert("other") as tmp:  # pushes "k" out
        tmp.write_bytes(b"o" * 100)
    assert "k" not in two
    assert f.read() == b"k" * 100
    f.close()


# ------------------------------------------------------------------ packing

def test_pack_writes_what_the_studioml_client_writes(tmp_path):
    src = tmp_path / "modeldir"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"w")
    (src / "sub" / "x.txt").write_text("x")
    packing.pack(src, tmp_path / "m.tar")
    with tarfile.open(tmp_path / "m.tar") as tar:  # plain tar, relative member names
        assert sorted(tar.getnames()) == ["sub", "sub/x.txt", "weights.bin"]
    packing.unpack(tmp_path / "m.tar", tmp_path / "back", 1 << 20)
    assert (tmp_path / "back" / "sub" / "x.txt").read_text() == "x"


# ------------------------------------------------------------------ against the store

def test_fetch_workspace_once_then_from_the_cache(store, tmp_path, monkeypatch):
    key = f"blobstore/{uuid.uuid4().hex}.tar"
    put(store, key, make_tar({"train.py": b"print('hi')\n", "data/a.txt": b"a"}, prefix="./"))
    art = artifact(store, "workspace", key)
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    retry, _ = policy()
    downloads = []
    real_download = arts.download
    monkeypatch.setattr(arts, "download", lambda *a: downloads.append(a[0].key) or real_download(*a))
    assert arts.fetch(art, tmp_path / "j1" / "workspace", cache, retry, 1 << 20) is not None
    assert (tmp_path / "j1" / "workspace" / "train.py").read_text() == "print('hi')\n"
    assert arts.fetch(art, tmp_path / "j2" / "workspace", cache, retry, 1 << 20) is not None
    assert (tmp_path / "j2" / "workspace" / "data" / "a.txt").read_text() == "a"
    assert downloads == [key]  # the second came from the cache


def test_the_cache_never_serves_an_object_the_request_cannot_read(store, tmp_path):
    """A request with no (or wrong) credentials names a key another experiment uploaded: the
    cached copy is not handed over; the store's refusal is the answer."""
    key = f"blobstore/{uuid.uuid4().hex}.tar"
    put(store, key, make_tar({"secret.txt": b"another tenant's data"}))
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    retry, _ = policy(attempts=1)
    assert arts.fetch(artifact(store, "workspace", key), tmp_path / "owner", cache, retry, 1 << 20) is not None
    thief = artifact(store, "workspace", key, secret="wrong-secret")
    with pytest.raises(arts.AccessDenied):
        arts.fetch(thief, tmp_path / "thief", cache, retry, 1 << 20)
    unsigned = Artifact(name="workspace", key=key, bucket=store.bucket, endpoint_url=store.endpoint_url,
                        mutable=False, unpack=True, access_key=None, secret_key=None, region=None,
                        session_token=None)
    with pytest.raises(arts.AccessDenied):
        arts.fetch(unsigned, tmp_path / "thief2", cache, retry, 1 << 20)
    assert not (tmp_path / "thief" / "secret.txt").exists() and not (tmp_path / "thief2" / "secret.txt").exists()


def test_a_key_that_now_holds_other_bytes_is_a_cache_miss(store, tmp_path):
    key = f"blobstore/{uuid.uuid4().hex}.tar"
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    retry, _ = policy()
    put(store, key, make_tar({"v.txt": b"one"}))
    arts.fetch(artifact(store, "workspace", key), tmp_path / "a", cache, retry, 1 << 20)
    put(store, key, make_tar({"v.txt": b"two"}))
    arts.fetch(artifact(store, "workspace", key), tmp_path / "b", cache, retry, 1 << 20)
    assert (tmp_path / "b" / "v.txt").read_text() == "two"


def test_compressed_tars_are_read_too(store, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("f.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"gz"))
    key = f"blobstore/{uuid.uuid4().hex}.tar"
    put(store, key, buf.getvalue())
    retry, _ = policy()
    arts.fetch(artifact(store, "workspace", key), tmp_path / "w", None, retry, 1 << 20)
    assert (tmp_path / "w" / "f.txt").read_text() == "gz"


def test_missing_mutable_artifact_is_an_empty_directory(store, tmp_path):
    retry, sleeps = policy()
    art = artifact(store, "modeldir", f"experiments/{uuid.uuid4().hex}/modeldir.tar", mutable=True)
    assert arts.fetch(art, tmp_path / "modeldir", None, retry, 1 << 20) is None
    assert (tmp_path / "modeldir").is_dir() and not list((tmp_path / "modeldir").iterdir())
    assert sleeps == []


def test_missing_workspace_is_a_clear_permanent_error(store, tmp_path):
    retry, sleeps = policy()
    art = artifact(store, "workspace", f"blobstore/{uuid.uuid4().hex}.tar")
    with pytest.raises(arts.ArtifactMissing, match="artifact 'workspace'"):
        arts.fetch(art, tmp_path / "w", ArtifactCache(tmp_path / "c", 1 << 20), retry, 1 << 20)
    assert sleeps == []


def test_unpack_false_places_the_object_as_a_file(store, tmp_path):
    key = f"data/{uuid.uuid4().hex}/table.csv"
    put(store, key, b"a,b\n1,2\n")
    retry, _ = policy()
    arts.fetch(artifact(store, "data", key, unpack=False), tmp_path / "data", None, retry, 1 << 20)
    assert (tmp_path / "data" / "table.csv").read_bytes() == b"a,b\n1,2\n"


def test_wrong_credentials_fail_fast_naming_artifact_and_endpoint(store, tmp_path):
    key = f"blobstore/{uuid.uuid4().hex}.tar"
    put(store, key, make_tar({"a": b"a"}))
    retry, sleeps = policy()
    art = artifact(store, "workspace", key, secret="wrong-secret")
    with pytest.raises(arts.AccessDenied) as e:
        arts.fetch(art, tmp_path / "w", None, retry, 1 << 20)
    assert "workspace" in str(e.value) and store.endpoint_url in str(e.value)
    assert sleeps == []  # not retried: retrying cannot help


def test_no_credentials_means_unsigned_never_the_runners_own(store, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", store.access_key)  # the runner's environment
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store.secret_key)
    key = f"blobstore/{uuid.uuid4().hex}.tar"
    put(store, key, make_tar({"a": b"a"}))
    art = Artifact(name="workspace", key=key, bucket=store.bucket, endpoint_url=store.endpoint_url,
                   mutable=False, unpack=True, access_key=None, secret_key=None, region=None,
                   session_token=None)
    retry, _ = policy()
    with pytest.raises(arts.AccessDenied):
        arts.fetch(art, tmp_path / "w", None, retry, 1 << 20)


def test_store_down_is_retried_with_backoff_then_unavailable(tmp_path):
    port = free_port()
    art = Artifact(name="workspace", key="blobstore/x.tar", bucket="b",
                   endpoint_url=f"http://127.0.0.1:{port}", mutable=False, unpack=True,
                   access_key="a", secret_key="s", region="us-east-1", session_token=None)
    retry, sleeps = policy(attempts=3)
    with pytest.raises(arts.StoreUnavailable, match="gave up after 3 attempts"):
        arts.fetch(art, tmp_path / "w", ArtifactCache(tmp_path / "c", 1 << 20), retry, 1 << 20)
    assert sleeps == [0.5, 1]
    assert "blobstore/x.tar" not in ArtifactCache(tmp_path / "c", 1 << 20)


def test_hostile_workspace_tar_is_refused(store, tmp_path):
    key = f"blobstore/{uuid.uuid4().hex}.tar"
    put(store, key, make_tar({"ok.txt": b"ok", "../../escaped.txt": b"evil"}))
    retry, _ = policy()
    with pytest.raises(arts.ArtifactError, match="unsafe"):
        arts.fetch(artifact(store, "workspace", key), tmp_path / "job" / "workspace", None,
                   retry, 1 << 20)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_oversized_workspace_is_refused(store, tmp_path):
    key = f"blobstore/{uuid.uuid4().hex}.tar"
    put(store, key, make_tar({"big.bin": b"0" * 5000}))
    retry, _ = policy()
    with pytest.raises(arts.ArtifactError):
        arts.fetch(artifact(store, "workspace", key), tmp_path / "w", None, retry, 1000)


def test_uploader_sends_changed_directories_only(store, tmp_path):
    exp = uuid.uuid4().hex
    job = tmp_path / "job"
    names = ("output", "modeldir", "retval")
    art_map = {n: artifact(store, n, f"experiments/{exp}/{n}.tar", mutable=True) for n in names}
    art_map["workspace"] = artifact(store, "workspace", "blobstore/never-uploaded.tar")
    for n in names:
        (job / n).mkdir(parents=True)
    retry, _ = policy()
    up = Uploader(art_map, job, retry)
    up.mark_current()
    assert up.upload_changed() == []
    (job / "output" / "output").write_text("line 1\n")
    (job / "modeldir" / "ckpt").write_bytes(b"\x00\x01")
    assert sorted(up.upload_changed()) == ["modeldir", "output"]
    assert up.upload_changed() == []
    (job / "output" / "output").write_text("line 1\nline 2\n")
    assert up.upload_changed() == ["output"]
    # what the store holds unpacks to what the job had
    arts.fetch(art_map["output"], tmp_path / "back" / "output", None, retry, 1 << 20)
    assert (tmp_path / "back" / "output" / "output").read_text() == "line 1\nline 2\n"
    body = store.client().get_object(Bucket=store.bucket, Key=f"experiments/{exp}/output.tar")
    with tarfile.open(fileobj=io.BytesIO(body["Body"].read()), mode="r:") as tar:
        assert tar.getnames() == ["output"]


def test_uploader_reports_a_store_that_is_down(tmp_path):
    job = tmp_path / "job"
    (job / "output").mkdir(parents=True)
    (job / "output" / "output").write_text("x")
    art = Artifact(name="output", key="experiments/e/output.tar", bucket="b",
                   endpoint_url=f"http://127.0.0.1:{free_port()}", mutable=True, unpack=True,
                   access_key="a", secret_key="s", region="us-east-1", session_token=None)
    retry, _ = policy(attempts=2)
    up = Uploader({"output": art}, job, retry)
    with pytest.raises(arts.StoreUnavailable):
        up.upload_changed()
    assert up.last_upload is None


# ------------------------------------------------------------------ which mutable artifacts exist

def test_one_listing_tells_which_mutable_artifacts_exist(store, tmp_path, monkeypatch):
    exp = uuid.uuid4().hex
    names = ["output", "modeldir", "retval"]
    art_map = {n: artifact(store, n, f"experiments/{exp}/{n}.tar", mutable=True) for n in names}
    put(store, f"experiments/{exp}/modeldir.tar", make_tar({"ckpt": b"step 7"}))
    put(store, f"experiments/{exp}x/output.tar", make_tar({"other": b"x"}))  # same prefix, not ours
    retry, sleeps = policy()
    calls = []
    real_download = arts.download
    monkeypatch.setattr(arts, "download", lambda a, d, r: (calls.append(a.name),
                                                           real_download(a, d, r)))
    known = arts.listed(list(art_map.values()), retry)
    assert known == {"output": False, "modeldir": True, "retval": False}
    for n in names:
        arts.fetch(art_map[n], tmp_path / n, None, retry, 1 << 20, exists=known[n])
    assert calls == ["modeldir"]  # nothing asked for what the listing did not show
    assert (tmp_path / "modeldir" / "ckpt").read_bytes() == b"step 7"
    assert not list((tmp_path / "output").iterdir()) and not list((tmp_path / "retval").iterdir())
    assert sleeps == []


def test_what_cannot_be_listed_is_left_to_a_fetch_of_its_own(store, tmp_path):
    retry, _ = policy()
    lone = artifact(store, "data", "data.tar", mutable=True)  # no folder to list
    wrong = artifact(store, "tb", f"experiments/{uuid.uuid4().hex}/tb.tar", mutable=True,
                     secret="wrong-secret")  # refused: fetching it says so, as before
    assert arts.listed([lone, wrong], retry) == {}
    with pytest.raises(arts.AccessDenied):
        arts.fetch(wrong, tmp_path / "tb", None, retry, 1 << 20)


def test_listing_a_store_that_is_down_says_so(tmp_path):
    art = Artifact(name="output", key="experiments/e/output.tar", bucket="b",
                   endpoint_url=f"http://127.0.0.1:{free_port()}", mutable=True, unpack=True,
                   access_key="a", secret_key="s", region="us-east-1", session_token=None)
    retry, sleeps = policy(attempts=2)
    with pytest.raises(arts.StoreUnavailable, match="listing artifact 'output'"):
        arts.listed([art], retry)
    assert sleeps == [0.5]


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def test_a_big_output_goes_up_and_down_in_parallel_parts_in_bounded_memory(store, tmp_path):
    import hashlib
    import threading
    import time

    job = tmp_path / "job"
    (job / "output").mkdir(parents=True)
    block = os.urandom(1 << 20)
    with open(job / "output" / "big.bin", "wb") as f:
        for _ in range(96):
            f.write(block)
    art = artifact(store, "output", f"experiments/{uuid.uuid4().hex}/output.tar", mutable=True)
    client = arts.client_for(art)
    lock, flight, most = threading.Lock(), [0], [0]

    def sent(**_):
        with lock:
            flight[0] += 1
            most[0] = max(most[0], flight[0])

    def done(**_):
        with lock:
            flight[0] -= 1

    # a runner has moved artifacts before: its client, threads and imports are not this output's cost
    warm = tmp_path / "warm"
    (warm / "output").mkdir(parents=True)
    (warm / "output" / "w.bin").write_bytes(block * 17)
    arts.upload(artifact(store, "output", f"experiments/{uuid.uuid4().hex}/output.tar", mutable=True),
                warm / "output", RetryPolicy(attempts=1))
    peak, stop = [_rss()], threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(_rss())
            time.sleep(0.01)

    base = _rss()
    watcher = threading.Thread(target=watch)
    watcher.start()
    for event, fn in (("before-call.s3.UploadPart", sent), ("after-call.s3.UploadPart", done),
                      ("before-call.s3.GetObject", sent), ("after-call.s3.GetObject", done)):
        client.meta.events.register(event, fn)
    try:
        arts.upload(art, job / "output", RetryPolicy(attempts=1))
        up_parallel, most[0] = most[0], 0
        up_growth, base = max(peak) - base, _rss()  # each transfer against the RSS it started from
        del peak[:]
        assert arts.fetch(art, tmp_path / "back" / "output", None, RetryPolicy(attempts=1), 1 << 30) is not None
        down_parallel = most[0]
    finally:
        stop.set()
        watcher.join()
        for event, fn in (("before-call.s3.UploadPart", sent), ("after-call.s3.UploadPart", done),
                          ("before-call.s3.GetObject", sent), ("after-call.s3.GetObject", done)):
            client.meta.events.unregister(event, fn)
    assert up_parallel > 1 and down_parallel > 1, (up_parallel, down_parallel)
    down_growth = max(peak, default=base) - base
    assert up_growth < 64 << 20, f"RSS grew by {up_growth >> 20} MiB while uploading"
    assert down_growth < 64 << 20, f"RSS grew by {down_growth >> 20} MiB while downloading"
    digest = [hashlib.sha256((d / "output" / "big.bin").read_bytes()).hexdigest() for d in (job, tmp_path / "back")]
    assert digest[0] == digest[1]
