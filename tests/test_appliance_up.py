"""`appliance up` on this machine: slots pinned as planned, the store up with private keys,
`appliance down` leaving nothing behind. Real supervisord, SeaweedFS, cgroups and processes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from appliance.slot.limits import parse_cpu_list
from appliance.store.client import s3_client


def _kernel_cpus(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpu_list(line.split(":", 1)[1])
    raise AssertionError("no Cpus_allowed_list")


def _shm_size(pid: int) -> int:
    st = os.statvfs(f"/proc/{pid}/root/dev/shm")  # seen from inside the process's mount namespace
    return st.f_blocks * st.f_frsize


def _memory_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            slot_dir = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return int((slot_dir.parent / "memory.limit_in_bytes").read_text())  # limits sit on the slot
    raise AssertionError("process is in no memory cgroup")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _secret_values(data) -> list[str]:
    """Every string under a key that names a secret, in the store's secrets file."""
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, str) and "secret" in k.lower() and len(v) >= 8:
                found.append(v)
            else:
                found += _secret_values(v)
    elif isinstance(data, list):
        for v in data:
            found += _secret_values(v)
    return found


def test_up_runs_every_slot_as_planned_and_down_leaves_nothing(appliance_home):
    out = appliance_home.cli("up", "--timeout", "90")
    assert "s3.env" in out.stdout and "AWS_ACCESS_KEY_ID" in out.stdout
    secrets = json.loads((appliance_home.home.secrets_dir / "store.json").read_text())
    for value in _secret_values(secrets):
        assert value not in out.stdout + out.stderr, "up printed a secret"

    facts = appliance_home.status()
    plan = json.loads(appliance_home.home.plan_file.read_text())
    assert len(facts["slots"]) == len(plan["slots"]) == os.cpu_count()  # reserved_cpus = 0
    pids = []
    for slot, planned in zip(facts["slots"], plan["slots"]):
        assert slot["state"] == "RUNNING", slot
        assert slot["cpus"] == planned["cpus"]
        assert _kernel_cpus(slot["pid"]) == planned["cpus"]
        assert _shm_size(slot["pid"]) == planned["shm_bytes"] == slot["shm_bytes"] == 64 * 1024**2
        assert _memory_limit(slot["pid"]) == planned["memory_bytes"] == slot["memory_bytes"] == 512 * 1024**2
        pids.append(slot["pid"])
    assert len({tuple(s["cpus"]) for s in facts["slots"]}) == len(facts["slots"])  # no CPU shared
    assert facts["store"]["healthy"], facts["store"]

    # the store answers the keys of the `appliance` mc alias, and refuses a wrong secret
    alias = json.loads((Path(appliance_home.env["MC_CONFIG_DIR"]) / "config.json").read_text())["aliases"]["appliance"]
    client = s3_client(alias["url"], alias["accessKey"], alias["secretKey"])
    client.put_object(Bucket="appliance", Key="hello.txt", Body=b"hi")
    assert client.get_object(Bucket="appliance", Key="hello.txt")["Body"].read() == b"hi"
    wrong = s3_client(alias["url"], alias["accessKey"], alias["secretKey"] + "x", attempts=1)
    with pytest.raises(ClientError) as err:
        wrong.get_object(Bucket="appliance", Key="hello.txt")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    for secret in (appliance_home.home.store_credentials, appliance_home.home.store_identities):
        assert secret.stat().st_mode & 0o777 == 0o600

    # up again is safe: nothing restarts
    appliance_home.cli("up", "--timeout", "90")
    assert [s["pid"] for s in appliance_home.status()["slots"]] == pids

    appliance_home.cli("down")
    assert not any(_alive(p) for p in pids)
    after = appliance_home.status()
    assert not after["running"]
    assert all(s["state"] == "STOPPED" for s in after["slots"])


def test_up_refuses_a_taken_port_and_starts_nothing(appliance_home):
    config = appliance_home.home.config_file.read_text()
    port = int(config.split("port = ")[1].split()[0])
    with socket.socket() as blocker:  # the S3 port: the store's only port on the host
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        result = appliance_home.cli("up", check=False)
    assert result.returncode == 2
    assert f"{port}" in result.stderr and "object_store.port" in result.stderr
    assert not appliance_home.status()["running"]


def test_up_with_bad_config_names_the_key(appliance_home):
    appliance_home.home.config_file.write_text('[slots.cpu]\nmemroy = "1GiB"\n')
    result = appliance_home.cli("up", check=False)
    assert result.returncode == 2
    assert "slots.cpu.memroy" in result.stderr and "did you mean 'memory'" in result.stderr
    assert "Traceback" not in result.stderr


def test_up_with_impossible_slots_says_what_the_host_has(appliance_home):
    appliance_home.home.config_file.write_text("[slots.cpu]\ncount = 64\n")
    result = appliance_home.cli("up", check=False)
    assert result.returncode == 2
    assert "slots.cpu.count = 64" in result.stderr
    assert not appliance_home.status()["running"]


def test_a_store_that_fails_to_start_is_reported_and_nothing_is_left(appliance_home, tmp_path):
    broken = tmp_path / "minio"
    broken.write_text("#!/bin/sh\necho 'FATAL Unable to use the drive: disk is on fire' >&2\nexit 1\n")
    broken.chmod(0o755)
    appliance_home.cli("config", "set", "object_store.kind", "minio")
    appliance_home.cli("config", "set", "object_store.minio_binary", str(broken))
    result = appliance_home.cli("up", "--timeout", "30", check=False)
    assert result.returncode == 2
    assert "store" in result.stderr and "disk is on fire" in result.stderr  # its own words, from its log
    assert "stopped again" in result.stderr
    facts = appliance_home.status()
    assert not facts["running"]
    assert not any(_alive(s["pid"]) for s in facts["slots"] if s["pid"])


def test_an_external_store_runs_no_local_store(appliance_home, store):
    appliance_home.cli("config", "set", "object_store.kind", "external")
    appliance_home.cli("config", "set", "object_store.endpoint", store.endpoint_url)
    secrets = appliance_home.home.store_credentials
    secrets.parent.mkdir(parents=True, exist_ok=True)
    secrets.write_text(json.dumps({"access_key": store.access_key, "secret_key": store.secret_key}))
    appliance_home.cli("up", "--timeout", "60")
    facts = appliance_home.status()
    assert facts["store"]["healthy"] and facts["store"]["endpoint"] == store.endpoint_url
    assert all(s["state"] == "RUNNING" for s in facts["slots"])
    assert "[program:store]" not in appliance_home.home.supervisord_conf.read_text()


def test_an_external_store_with_wrong_keys_is_refused_at_up(appliance_home, store):
    appliance_home.cli("config", "set", "object_store.kind", "external")
    appliance_home.cli("config", "set", "object_store.endpoint", store.endpoint_url)
    secrets = appliance_home.home.store_credentials
    secrets.parent.mkdir(parents=True, exist_ok=True)
    secrets.write_text(json.dumps({"access_key": store.access_key, "secret_key": "wrong"}))
    result = appliance_home.cli("up", "--timeout", "20", check=False)
    assert result.returncode == 2
    assert "refused the appliance's credentials" in result.stderr
    assert not appliance_home.status()["running"]
