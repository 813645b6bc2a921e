"""The StudioML request model: the real client message, units, and every way a message is bad."""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import pytest

from appliance.studioml.request import (BadRequest, Resources, parse_duration, parse_request,
                                      parse_size, unmet)

FIXTURE = Path(__file__).parent / "fixtures" / "studioml-request.json"
GiB = 2**30


@pytest.fixture
def raw() -> dict:
    return json.loads(FIXTURE.read_text())


def body(d: dict) -> bytes:
    return json.dumps(d).encode()


def test_real_client_message(raw):
    req = parse_request(FIXTURE.read_bytes())
    assert req.key == "exp-local-001"
    assert req.filename == "train.py"
    assert req.args == ("--lr", "0.1")
    assert "studioml==0.0.49" in req.pythonenv
    assert req.pythonver == "3.11"
    assert req.resources == Resources(cpus=1, gpus=0, ram_bytes=2 * GiB, hdd_bytes=3 * GiB,
                                      gpu_mem_bytes=0)
    assert req.max_duration_s is None
    assert req.lifetime_s == 1800
    assert req.save_every_s == 180
    assert req.time_added == pytest.approx(1795341047.03)
    assert req.env == {"AWS_DEFAULT_REGION": "us-west-2", "PATH": "%PATH%:./bin"}
    assert req.pip == ("numpy",)
    assert req.raw == raw
    assert set(req.artifacts) == {"workspace", "modeldir", "retval", "output", "tb",
                                  "_metrics", "_metadata"}
    ws = req.artifacts["workspace"]
    assert ws.key.startswith("blobstore/") and ws.key.endswith(".tar")
    assert ws.bucket == "studioml-artifacts"
    assert ws.endpoint_url == "http://127.0.0.1:5000"
    assert (ws.mutable, ws.unpack) == (False, True)
    assert (ws.access_key, ws.secret_key, ws.region, ws.session_token) == (
        "testing", "testing", "us-west-2", None)
    out = req.artifacts["output"]
    assert out.key == "experiments/exp-local-001/output.tar" and out.mutable


def test_accepts_str_body():
    assert parse_request(FIXTURE.read_text()).key == "exp-local-001"


@pytest.mark.parametrize("text, expected", [
    ("2gb", 2 * GiB), ("2GB", 2 * GiB), ("2GiB", 2 * GiB), ("2g", 2 * GiB), ("2Gb", 2 * GiB),
    ("512Mb", 512 * 2**20), ("512mib", 512 * 2**20), ("1.5gb", 3 * 2**29), ("0gb", 0),
    ("4kb", 4096), ("1tb", 2**40), (3, 3), ("3", 3), ("3b", 3), (" 7 mb ", 7 * 2**20),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1gb", -5, "2xb", "gb", "2ib", "1e3", True, None,
                                  [], "2bb", "9999999pb", float("nan"), float("inf")])
def test_parse_size_rejects(text):
    with pytest.raises(BadRequest):
        parse_size(text)


@pytest.mark.parametrize("text, expected", [
    ("75s", 75), ("3m", 180), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("1d", 86400),
    ("500ms", 0.5), (90, 90), ("90", 90), (None, None), ("", None), ("0s", None), (0, None),
    ("1.5h", 5400),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["soon", "-3m", -1, "3 minutes", "m", "5y", "3m junk", True,
                                  [], "99999d"])
def test_parse_duration_rejects(text):
    with pytest.raises(BadRequest):
        parse_duration(text)


def _set(d: dict, dotted: str, value):
    *path, last = dotted.split(".")
    for p in path:
        d = d[p]
    if value is _DELETE:
        del d[last]
    else:
        d[last] = value


_DELETE = object()


@pytest.mark.parametrize("dotted, value, field", [
    ("experiment", _DELETE, "experiment"),
    ("experiment", "nope", "experiment"),
    ("experiment.key", _DELETE, "experiment.key"),
    ("experiment.key", "", "experiment.key"),
    ("experiment.key", "../etc", "experiment.key"),
    ("experiment.filename", _DELETE, "experiment.filename"),
    ("experiment.filename", 7, "experiment.filename"),
    ("experiment.artifacts", _DELETE, "experiment.artifacts"),
    ("experiment.artifacts.workspace", _DELETE, "experiment.artifacts.workspace"),
    ("experiment.artifacts.workspace.key", "/etc/passwd", "experiment.artifacts.workspace.key"),
    ("experiment.artifacts.output.key", "experiments/../../x.tar",
     "experiment.artifacts.output.key"),
    ("experiment.artifacts.workspace.qualified", "http://host/b/k",
     "experiment.artifacts.workspace.qualified"),
    ("experiment.artifacts.workspace.mutable", "yes", "experiment.artifacts.workspace.mutable"),
    ("experiment.artifacts.tb", [], "experiment.artifacts.tb"),
    ("experiment.artifacts.workspace.credentials", {"aws": {"access_key": 5}},
     "experiment.artifacts.workspace.credentials.aws.access_key"),
    ("experiment.resources_needed.cpus", -1, "experiment.resources_needed.cpus"),
    ("experiment.resources_needed.cpus", 10000, "experiment.resources_needed.cpus"),
    ("experiment.resources_needed.cpus", 1.5, "experiment.resources_needed.cpus"),
    ("experiment.resources_needed.cpus", True, "experiment.resources_needed.cpus"),
    ("experiment.resources_needed.gpus", "many", "experiment.resources_needed.gpus"),
    ("experiment.resources_needed.ram", "lots", "experiment.resources_needed.ram"),
    ("experiment.resources_needed.hdd", "-3gb", "experiment.resources_needed.hdd"),
    ("experiment.resources_needed.gpuMem", "2zb", "experiment.resources_needed.gpuMem"),
    ("experiment.resources_needed", "big", "experiment.resources_needed"),
    ("experiment.max_duration", "forever", "experiment.max_duration"),
    ("experiment.args", "--lr 0.1", "experiment.args"),
    ("experiment.pythonenv", [1, 2], "experiment.pythonenv"),
    ("experiment.pythonver", "three", "experiment.pythonver"),
    ("experiment.time_added", "yesterday", "experiment.time_added"),
    ("config", [], "config"),
    ("config.experimentLifetime", "-30m", "config.experimentLifetime"),
    ("config.saveWorkspaceFrequency", "often", "config.saveWorkspaceFrequency"),
    ("config.env", {"A": ["x"]}, "config.env"),
    ("config.pip", "numpy", "config.pip"),
])
def test_bad_field_is_named(raw, dotted, value, field):
    _set(raw, dotted, value)
    with pytest.raises(BadRequest) as e:
        parse_request(body(raw))
    assert str(e.value).startswith(field), str(e.value)


@pytest.mark.parametrize("text", [b"", b"{", b"\xff\xfe", b"[1,2]", b"null", b'"x"'])
def test_malformed_json(text):
    with pytest.raises(BadRequest, match="message"):
        parse_request(text)


def test_endpoint_scheme_rules(raw):
    arts = raw["experiment"]["artifacts"]
    arts["tb"]["qualified"] = "s3://s3.us-west-2.amazonaws.com/bkt/experiments/e/tb.tar"
    arts["tb"]["bucket"] = "bkt"
    arts["output"]["qualified"] = "s3://minio.lan:9000/studioml-artifacts/o.tar"
    del arts["output"]["key"]
    raw["config"]["storage"]["endpoint"] = "https://127.0.0.1:5000"
    req = parse_request(body(raw))
    assert req.artifacts["tb"].endpoint_url == "https://s3.us-west-2.amazonaws.com"
    assert req.artifacts["output"].endpoint_url == "http://minio.lan:9000"
    assert req.artifacts["output"].key == "o.tar"
    # same host as config.storage.endpoint: the config keeps the scheme qualified lost
    assert req.artifacts["workspace"].endpoint_url == "https://127.0.0.1:5000"


def test_artifact_without_qualified_uses_storage_config(raw):
    ws = raw["experiment"]["artifacts"]["workspace"]
    del ws["qualified"], ws["bucket"], ws["credentials"]
    req = parse_request(body(raw))
    a = req.artifacts["workspace"]
    assert (a.endpoint_url, a.bucket, a.access_key) == (
        "http://127.0.0.1:5000", "studioml-artifacts", "testing")


def test_hostless_qualified(raw):
    ws = raw["experiment"]["artifacts"]["workspace"]
    ws["qualified"] = "s3://studioml-artifacts/" + ws["key"]
    a = parse_request(body(raw)).artifacts["workspace"]
    assert a.endpoint_url == "http://127.0.0.1:5000" and a.bucket == "studioml-artifacts"


def test_missing_resources_fall_back_to_config(raw):
    del raw["experiment"]["resources_needed"]
    raw["config"]["resources_needed"]["cpus"] = 3
    assert parse_request(body(raw)).resources.cpus == 3


def test_ignores_unknown_fields(raw):
    raw["experiment"]["something_new"] = {"x": 1}
    raw["config"]["runner"] = {"slack_destination": "#x"}
    assert parse_request(body(raw)).key == "exp-local-001"


def test_request_is_frozen(raw):
    req = parse_request(body(raw))
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.key = "other"


R = Resources(cpus=2, gpus=1, ram_bytes=4 * GiB, hdd_bytes=10 * GiB, gpu_mem_bytes=8 * GiB)
R4 = Resources(cpus=2, gpus=4, ram_bytes=4 * GiB, hdd_bytes=10 * GiB, gpu_mem_bytes=8 * GiB)


@pytest.mark.parametrize("slot, reason", [
    (dict(cpus=2, memory_bytes=4 * GiB, gpus=1, gpu_mem_bytes=8 * GiB, disk_bytes=None), None),
    (dict(cpus=8, memory_bytes=64 * GiB, gpus=2, gpu_mem_bytes=16 * GiB, disk_bytes=GiB * 100),
     None),
    (dict(cpus=1, memory_bytes=64 * GiB, gpus=1, gpu_mem_bytes=8 * GiB, disk_bytes=None),
     "needs 2 cpus, slot has 1"),
    (dict(cpus=2, memory_bytes=2 * GiB, gpus=1, gpu_mem_bytes=8 * GiB, disk_bytes=None),
     "needs 4 GiB ram, slot has 2 GiB"),
    (dict(cpus=2, memory_bytes=4 * GiB, gpus=0, gpu_mem_bytes=0, disk_bytes=None),
     "needs 1 gpus, slot has 0"),
    (dict(cpus=2, memory_bytes=4 * GiB, gpus=1, gpu_mem_bytes=6 * GiB, disk_bytes=None),
     "needs 8 GiB per gpu, slot's gpus have 6 GiB for it (a slot gets all of a GPU's memory with "
     "slots.gpu.share = 1 and MIG off)"),
    (dict(cpus=2, memory_bytes=4 * GiB, gpus=1, gpu_mem_bytes=8 * GiB, disk_bytes=None, resources=R4),
     "needs 4 gpus, slot has 1 (slots of several GPUs: slots.gpu.gpus_per_slot)"),
    (dict(cpus=2, memory_bytes=4 * GiB, gpus=1, gpu_mem_bytes=8 * GiB, disk_bytes=GiB),
     "needs 10 GiB disk, slot has 1 GiB free"),
])
def test_unmet(slot, reason):
    assert unmet(slot.pop("resources", R), **slot) == reason


def test_unmet_ignores_gpu_mem_without_gpus():
    r = Resources(cpus=1, gpus=0, ram_bytes=0, hdd_bytes=0, gpu_mem_bytes=8 * GiB)
    assert unmet(r, cpus=1, memory_bytes=GiB, gpus=0, gpu_mem_bytes=0, disk_bytes=0) is None


# ---------------------------------------------------------------- fields that name files

@pytest.mark.parametrize("name", ["/etc", "../up", "..", ".hidden", "a/b", "-rf", "x" * 101, "bad\udc80name"])
def test_artifact_names_that_are_not_plain_folder_names_are_refused(raw, name):
    raw["experiment"]["artifacts"][name] = raw["experiment"]["artifacts"]["output"]
    with pytest.raises(BadRequest, match="experiment.artifacts: name"):
        parse_request(json.dumps(raw))


@pytest.mark.parametrize("filename", ["/etc/passwd", "../../bin/sh", "sub/../../x.py", "-c", "-m os; x"])
def test_a_filename_outside_the_workspace_is_refused(raw, filename):
    raw["experiment"]["filename"] = filename
    with pytest.raises(BadRequest, match="experiment.filename"):
        parse_request(json.dumps(raw))


@pytest.mark.parametrize("filename", ["train.py", "src/train.py", "-m pkg.train"])
def test_filenames_inside_the_workspace_and_modules_are_fine(raw, filename):
    raw["experiment"]["filename"] = filename
    assert parse_request(json.dumps(raw)).filename == filename


@pytest.mark.parametrize("key", ["k" * 300, "bad\udc80key", "line\nbreak", ".hidden"])
def test_experiment_keys_that_cannot_name_a_folder_are_refused(raw, key):
    raw["experiment"]["key"] = key
    with pytest.raises(BadRequest, match="experiment.key"):
        parse_request(json.dumps(raw))


@pytest.mark.parametrize("text", ["[" * 100_000, '{"experiment": ' * 50_000, '{"a": 1e999999}'])
def test_any_body_is_a_bad_request_never_a_crash(text):
    with pytest.raises(BadRequest):
        parse_request(text)


@pytest.mark.parametrize("field,value,match", [
    ("bucket", "bad bucket!", "bucket"),
    ("qualified", "s3://host:notaport/b/k", "endpoint"),
])
def test_bad_bucket_names_and_endpoints_are_the_request_s_error(raw, field, value, match):
    raw["experiment"]["artifacts"]["output"][field] = value
    with pytest.raises(BadRequest, match=match):
        parse_request(json.dumps(raw))
