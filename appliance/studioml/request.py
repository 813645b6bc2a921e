"""The StudioML experiment request, parsed and checked once, before anything runs.

Wire format: /work/shared/design/STUDIOML.md (the `studioml` 0.0.49 client). A runner trusts
nothing in a message: every field it uses is type- and range-checked here, and anything wrong
raises `BadRequest` naming the field, so the runner can dead-letter the message with a reason a
human understands.

Size units: StudioML's own client (`memstr2int` in gpu_util) reads "2gb", "2g", "2GiB" all as
2 * 2**30, while the Go runner (go-humanize) reads "2gb" as 2 * 10**9. We follow the client,
whose users wrote the numbers: every k/m/g/t/p suffix, with or without "b"/"ib", is binary.
That is also the stricter reading when matching a request against a slot.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from appliance.studioml.keys import (ARTIFACT_NAME, MAX_KEY_CHARS, BadRequest, check_bucket,  # noqa: F401
                                     check_endpoint, check_filename, check_key, endpoint_for_host,
                                     storage_endpoint)

MAX_CPUS = 1024
MAX_GPUS = 256
MAX_BYTES = 2**50  # 1 PiB: more than any box; larger numbers are typos or garbage
MAX_DURATION_S = 366 * 24 * 3600.0


@dataclass(frozen=True)
class Artifact:
    name: str
    key: str
    bucket: str
    endpoint_url: str
    mutable: bool
    unpack: bool
    access_key: Optional[str]
    secret_key: Optional[str]
    region: Optional[str]
    session_token: Optional[str]


@dataclass(frozen=True)
class Resources:
    cpus: int
    gpus: int
    ram_bytes: int
    hdd_bytes: int
    gpu_mem_bytes: int


@dataclass(frozen=True)
class Request:
    key: str
    filename: str
    args: tuple
    pythonenv: tuple
    pythonver: Optional[str]
    resources: Resources
    max_duration_s: Optional[float]
    lifetime_s: Optional[float]
    time_added: Optional[float]
    save_every_s: Optional[float]
    env: dict
    pip: tuple
    artifacts: dict
    raw: dict


# ---------------------------------------------------------------- units

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*$")
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: Any, field: str = "size") -> int:
    """'2gb', '512Mb', '1.5GiB', '0gb', 3, '3' -> bytes (binary multiples, see module doc)."""
    if isinstance(text, bool):
        raise BadRequest(f"{field}: expected a size like '2gb', got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    elif isinstance(text, str):
        m = _SIZE.match(text.lower())
        if not m:
            raise BadRequest(f"{field}: expected a size like '2gb', got {text!r}")
        unit = m.group(2)
        unit = unit[:-2] if unit.endswith("ib") else unit[:-1] if unit.endswith("b") else unit
        if unit not in _SIZE_POWERS or (unit == "" and m.group(2) not in ("", "b")):
            raise BadRequest(f"{field}: unknown size unit in {text!r}")
        value = float(m.group(1)) * (1024 ** _SIZE_POWERS[unit])
    else:
        raise BadRequest(f"{field}: expected a size like '2gb', got {text!r}")
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"{field}: must not be negative, got {text!r}")
    if value > MAX_BYTES:
        raise BadRequest(f"{field}: {text!r} is more than 1 PiB")
    return int(value)


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: Any, field: str = "duration") -> Optional[float]:
    """'75s', '3m', '1h30m', '2h', 90 (seconds) -> seconds; null, '' and zero -> None (no limit).

    StudioML writes Go-style durations; a bare number counts as seconds.
    """
    if text is None:
        return None
    if isinstance(text, bool):
        raise BadRequest(f"{field}: expected a duration like '30m', got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    elif isinstance(text, str):
        s = text.strip().lower()
        if s == "":
            return None
        try:
            value = float(s)
        except ValueError:
            pos, value = 0, 0.0
            for m in _DURATION_PART.finditer(s):
                if m.start() != pos:
                    break
                value += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
                pos = m.end()
            if pos != len(s) or pos == 0:
                raise BadRequest(f"{field}: expected a duration like '30m', got {text!r}") from None
    else:
        raise BadRequest(f"{field}: expected a duration like '30m', got {text!r}")
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"{field}: must not be negative, got {text!r}")
    if value > MAX_DURATION_S:
        raise BadRequest(f"{field}: {text!r} is longer than a year")
    return value or None


def _count(value: Any, field: str, maximum: int) -> int:
    if value is None:
        return 0
    if isinstance(value, bool):
        raise BadRequest(f"{field}: expected a whole number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int):
        raise BadRequest(f"{field}: expected a whole number, got {value!r}")
    if value < 0:
        raise BadRequest(f"{field}: must not be negative, got {value}")
    if value > maximum:
        raise BadRequest(f"{field}: {value} is more than {maximum}")
    return value


# ---------------------------------------------------------------- resources

def _resources(d: Any, field: str) -> Resources:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise BadRequest(f"{field}: expected an object, got {type(d).__name__}")

    def size(name: str) -> int:
        v = d.get(name)
        return 0 if v in (None, "") else parse_size(v, f"{field}.{name}")

    return Resources(
        cpus=_count(d.get("cpus"), f"{field}.cpus", MAX_CPUS),
        gpus=_count(d.get("gpus"), f"{field}.gpus", MAX_GPUS),
        ram_bytes=size("ram"),
        hdd_bytes=size("hdd"),
        gpu_mem_bytes=size("gpuMem"),
    )


def _fmt_bytes(n: int) -> str:
    for unit, power in (("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if n >= 1024 ** power:
            return f"{n / 1024 ** power:.3g} {unit}"
    return f"{n} B"


def unmet(resources: Resources, cpus: int, memory_bytes: int, gpus: int, gpu_mem_bytes: int,
          disk_bytes: Optional[int]) -> Optional[str]:
    """None if a slot of this shape can run the request, else why not (for a human).

    `gpu_mem_bytes` is what the slot may use of its smallest GPU (all of it, 1/share of it, or a
    MIG device's); StudioML's gpuMem is per GPU and
    only counts when GPUs are asked for. `disk_bytes=None` means "unknown, don't check".
    """
    if resources.cpus > cpus:
        return f"needs {resources.cpus} cpus, slot has {cpus}"
    if resources.ram_bytes > memory_bytes:
        return (f"needs {_fmt_bytes(resources.ram_bytes)} ram, "
                f"slot has {_fmt_bytes(memory_bytes)}")
    if resources.gpus > gpus:
        hint = " (slots of several GPUs: slots.gpu.gpus_per_slot)" if resources.gpus > 1 else ""
        return f"needs {resources.gpus} gpus, slot has {gpus}{hint}"
    if resources.gpus and resources.gpu_mem_bytes > gpu_mem_bytes:
        return (f"needs {_fmt_bytes(resources.gpu_mem_bytes)} per gpu, "
                f"slot's gpus have {_fmt_bytes(gpu_mem_bytes)} for it (a slot gets all of a GPU's memory "
                "with slots.gpu.share = 1 and MIG off)")
    if disk_bytes is not None and resources.hdd_bytes > disk_bytes:
        return (f"needs {_fmt_bytes(resources.hdd_bytes)} disk, "
                f"slot has {_fmt_bytes(disk_bytes)} free")
    return None


# ---------------------------------------------------------------- artifacts

def _credentials(d: Any, field: str) -> tuple:
    """StudioML: `credentials.aws.{access_key, secret_access_key, region[_name], session_token}`."""
    if d in (None, "none", {}):
        return (None, None, None, None)
    if not isinstance(d, dict):
        raise BadRequest(f"{field}: expected an object, got {type(d).__name__}")
    aws = d.get("aws", d)
    if not isinstance(aws, dict):
        raise BadRequest(f"{field}.aws: expected an object, got {type(aws).__name__}")
    out = []
    for name in ("access_key", "secret_access_key", "region", "session_token"):
        v = aws.get(name)
        if v is None and name == "region":
            v = aws.get("region_name")
        if v is not None and not isinstance(v, str):
            raise BadRequest(f"{field}.aws.{name}: expected a string, got {type(v).__name__}")
        out.append(v or None)
    return tuple(out)


def _artifact(name: str, d: Any, config: dict) -> Artifact:
    field = f"experiment.artifacts.{name}"
    if not isinstance(d, dict):
        raise BadRequest(f"{field}: expected an object, got {type(d).__name__}")
    qualified = d.get("qualified")
    key, bucket, endpoint = d.get("key"), d.get("bucket"), None
    if bucket is not None and (not isinstance(bucket, str) or not bucket):
        raise BadRequest(f"{field}.bucket: expected a bucket name, got {bucket!r}")
    if qualified is not None:
        if not isinstance(qualified, str) or not qualified.startswith("s3://"):
            raise BadRequest(f"{field}.qualified: expected s3://host/bucket/key, "
                             f"got {qualified!r}")
        parts = qualified[len("s3://"):].split("/", 2)
        if bucket is not None and parts[0] == bucket:
            # host-less form s3://bucket/key: the endpoint comes from the config
            q_bucket, q_key = parts[0], "/".join(parts[1:])
            endpoint = storage_endpoint(config) or "https://s3.amazonaws.com"
        else:
            if len(parts) < 3 or not all(parts):
                raise BadRequest(f"{field}.qualified: expected s3://host/bucket/key, "
                                 f"got {qualified!r}")
            host, q_bucket, q_key = parts
            endpoint = endpoint_for_host(host, config)
        bucket = bucket or q_bucket
        key = key or q_key
    elif d.get("url") is not None:
        raise BadRequest(f"{field}: plain URL artifacts are not supported, only S3")
    if key is None:
        raise BadRequest(f"{field}: has neither 'key' nor 'qualified'")
    key = check_key(key, f"{field}.key")
    if bucket is None:
        storage = config.get("storage") if isinstance(config.get("storage"), dict) else {}
        bucket = storage.get("bucket")
        if not isinstance(bucket, str) or not bucket:
            raise BadRequest(f"{field}: no bucket (neither 'bucket', 'qualified' nor "
                             f"config.storage.bucket)")
    if endpoint is None:
        endpoint = storage_endpoint(config)
        if endpoint is None:
            raise BadRequest(f"{field}: no endpoint (neither 'qualified' nor "
                             f"config.storage.endpoint)")
    creds = d.get("credentials")
    if not creds and isinstance(config.get("storage"), dict):
        creds = config["storage"].get("credentials")  # the client's default store
    access, secret, region, token = _credentials(creds, f"{field}.credentials")
    for flag in ("mutable", "unpack"):
        if d.get(flag) is not None and not isinstance(d.get(flag), bool):
            raise BadRequest(f"{field}.{flag}: expected true/false, got {d.get(flag)!r}")
    bucket = check_bucket(bucket, f"{field}.bucket")
    endpoint = check_endpoint(endpoint, f"{field}.endpoint")
    return Artifact(name=name, key=key, bucket=bucket, endpoint_url=endpoint,
                    mutable=bool(d.get("mutable", False)), unpack=bool(d.get("unpack", True)),
                    access_key=access, secret_key=secret, region=region, session_token=token)


# ---------------------------------------------------------------- the request

def _strings(value: Any, field: str) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{field}: expected a list of strings")
    return tuple(value)


def _optional_float(value: Any, field: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{field}: expected a number, got {value!r}")
    return float(value)


def parse_request(body: "bytes | str") -> Request:
    """Parse and validate one queue message; raise BadRequest if it can never run.

    Never raises anything else for any body (deep nesting, huge numbers, odd unicode)."""
    try:
        return _parse_request(body)
    except BadRequest:
        raise
    except (RecursionError, MemoryError) as e:
        raise BadRequest(f"message: too deeply nested or too large to read ({type(e).__name__})") from None
    except Exception as e:  # a shape no rule above foresaw: still the message's fault
        raise BadRequest(f"message: cannot be read ({type(e).__name__}: {e})") from None


def _parse_request(body: "bytes | str") -> Request:
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"message: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise BadRequest(f"message: expected a JSON object, got {type(raw).__name__}")
    exp = raw.get("experiment")
    if not isinstance(exp, dict):
        raise BadRequest("experiment: missing or not an object")
    config = raw.get("config") if raw.get("config") is not None else {}
    if not isinstance(config, dict):
        raise BadRequest("config: expected an object")

    key = exp.get("key")
    if not isinstance(key, str) or not key.strip():
        raise BadRequest("experiment.key: missing or empty")
    if "/" in key or key in (".", "..") or "\x00" in key or key.startswith("."):
        raise BadRequest(f"experiment.key: {key!r} must not contain '/' or start with '.'")
    if len(key) > MAX_KEY_CHARS or not key.isprintable():
        raise BadRequest(f"experiment.key: must be at most {MAX_KEY_CHARS} printable characters "
                         f"(got {len(key)})")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("experiment.key: not valid unicode (a lone surrogate?)") from None
    filename = exp.get("filename")
    if not isinstance(filename, str) or not filename.strip():
        raise BadRequest("experiment.filename: missing or empty")
    filename = check_filename(filename)

    arts = exp.get("artifacts")
    if not isinstance(arts, dict):
        raise BadRequest("experiment.artifacts: missing or not an object")
    if "workspace" not in arts:
        raise BadRequest("experiment.artifacts.workspace: missing")
    for name in arts:
        if not isinstance(name, str) or not ARTIFACT_NAME.fullmatch(name):
            raise BadRequest(f"experiment.artifacts: name {name!r} is not allowed: names are letters, "
                             f"digits, '_', '-' and '.', up to 100, not starting with '.' or '-' (they "
                             f"name folders of the job)")
    artifacts = {name: _artifact(name, d, config) for name, d in arts.items()}

    env = config.get("env") or {}
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float)) and not isinstance(v, bool)
            for k, v in env.items()):
        raise BadRequest("config.env: expected an object of string values")

    pythonver = exp.get("pythonver")
    if pythonver is not None:
        if isinstance(pythonver, (int, float)) and not isinstance(pythonver, bool):
            pythonver = str(pythonver)
        if not isinstance(pythonver, str) or not re.fullmatch(r"[0-9]+(\.[0-9]+){0,2}", pythonver):
            raise BadRequest(f"experiment.pythonver: expected like '3.11', got {pythonver!r}")

    res_field = "experiment.resources_needed"
    res = exp.get("resources_needed")
    if res is None:
        res, res_field = config.get("resources_needed"), "config.resources_needed"

    return Request(
        key=key,
        filename=filename,
        args=_strings(exp.get("args"), "experiment.args"),
        pythonenv=_strings(exp.get("pythonenv"), "experiment.pythonenv"),
        pythonver=pythonver,
        resources=_resources(res, res_field),
        max_duration_s=parse_duration(exp.get("max_duration"), "experiment.max_duration"),
        lifetime_s=parse_duration(config.get("experimentLifetime"), "config.experimentLifetime"),
        time_added=_optional_float(exp.get("time_added"), "experiment.time_added"),
        save_every_s=parse_duration(config.get("saveWorkspaceFrequency"),
                                    "config.saveWorkspaceFrequency"),
        env={k: str(v) for k, v in env.items()},
        pip=_strings(config.get("pip"), "config.pip"),
        artifacts=artifacts,
        raw=raw,
    )
