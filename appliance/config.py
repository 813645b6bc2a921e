"""appliance.toml: a typed, validated config with defaults.

One piece, over 400 lines, on purpose: the whole schema of appliance.toml in one table, so the
defaults, checks and help that `config show`, the commented default file and the docs print
cannot drift apart.

The schema is the dataclasses below; every field has a default, a parser and a line of help.
An error names the file, the key, the bad value and what would be right. `set_value` edits the
file with tomlkit so the user's comments and layout survive.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Union

import tomllib

from appliance.files import write_atomic
from appliance.units import parse_duration, parse_size

Auto = Union[str, int]  # "auto" or a concrete value


class ConfigError(ValueError):
    """A problem with appliance.toml; the message says where and how to fix it."""


def _auto_or(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_auto(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return parse(value)
    parse_auto.__doc__ = f'"auto" or {parse.__doc__ or ""}'
    return parse_auto


def _int_at_least(low: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                value = int(str(value), 10)
            except ValueError:
                raise ValueError(f"{value!r} is not a whole number") from None
        if value < low:
            raise ValueError(f"{value} is less than {low}")
        return value
    return parse


def _one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    return parse


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not text (quote it)")
    return value


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "yes", "on", "1"):
        return True
    if str(value).lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _port(value: Any) -> int:
    port = _int_at_least(1)(value)
    if port > 65535:
        raise ValueError(f"{port} is above 65535")
    return port


def _listen(value: Any) -> str:
    """HOST:PORT to serve on, or empty (off)."""
    text = _text(value).strip()
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9464), or \"\" to turn it off")
    _port(port)
    return text


def _text_list(value: Any) -> tuple:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{value!r} is not a list")
    return tuple(str(v).strip() for v in value)


def _gpu_shapes(value: Any):
    """a number of GPUs per slot (1, 2, 4, 8) or a list of slot sizes like [4, 2, 2]"""
    if isinstance(value, str) and "," in value:
        value = [v for v in value.strip("[] ").split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("an empty list makes no slot")
        return tuple(_int_at_least(1)(v) for v in value)
    return _int_at_least(1)(value)


def _size(value: Any) -> int:
    return parse_size(value)


def _duration(value: Any) -> float:
    return parse_duration(value)


def opt(default: Any, parse: Callable[[Any], Any], help: str) -> Any:
    return field(default=default, metadata={"parse": parse, "help": help})


@dataclass(frozen=True)
class HostConfig:
    reserved_cpus: Auto = opt("auto", _auto_or(_int_at_least(0)),
                              'CPUs kept for the OS and the appliance; "auto" keeps 1 per 32 '
                              '(at least 1 when there are 2 or more)')
    reserved_memory: Auto = opt("auto", _auto_or(_size),
                                'memory kept for the OS and the appliance; "auto" keeps 10% (at least 1GiB)')


@dataclass(frozen=True)
class CpuSlotConfig:
    count: Auto = opt("auto", _auto_or(_int_at_least(0)),
                      'how many CPU slots; "auto" makes one from every CPU left after GPU slots and reserved CPUs')
    cpus: int = opt(1, _int_at_least(1), "CPUs per CPU slot")
    memory: Auto = opt("auto", _auto_or(_size),
                       'memory limit per CPU slot; "auto" shares the memory left out by CPUs')
    shm: Auto = opt("auto", _auto_or(_size), '/dev/shm size per CPU slot; "auto" is a quarter of its memory')


@dataclass(frozen=True)
class GpuSlotConfig:
    cpus: Auto = opt("auto", _auto_or(_int_at_least(1)),
                     'CPUs per GPU slot, picked close to the GPU; "auto" gives each up to 4, '
                     'leaving half the CPUs to CPU slots')
    memory: Auto = opt("auto", _auto_or(_size),
                       'memory limit per GPU slot; "auto" shares the memory left out by CPUs')
    shm: Auto = opt("auto", _auto_or(_size), '/dev/shm size per GPU slot; "auto" is a quarter of its memory')
    gpus_per_slot: Any = opt(1, _gpu_shapes,
                             'GPUs per GPU slot, picked by topology (NVLink, PCIe switch, NUMA node): a number '
                             'that divides the GPUs, or a list of slot sizes adding up to them, like [4, 2, 2]')
    share: int = opt(1, _int_at_least(1),
                     'slots per GPU: each gets 1/share of its memory (APPLIANCE_GPU_MEMORY_BYTES) and of the '
                     'CPUs a GPU slot gets; 1 with gpus_per_slot above 1, and with GPUs in MIG mode')


@dataclass(frozen=True)
class SlotsConfig:
    cpu: CpuSlotConfig = field(default_factory=CpuSlotConfig)
    gpu: GpuSlotConfig = field(default_factory=GpuSlotConfig)


@dataclass(frozen=True)
class GpusConfig:
    disabled: tuple = opt((), _text_list, "GPUs fenced by hand (index or UUID); see `appliance gpu disable`")
    poll_interval: float = opt(5.0, _duration, "how often the controller asks NVML about GPUs")


@dataclass(frozen=True)
class IsolationConfig:
    backend: str = opt("process", _one_of("process", "docker"),
                       '"process": cgroups + a private /dev/shm; "docker": one container per slot')
    user: str = opt("auto", _text,
                    'who workloads run as: "auto" (an unprivileged account per slot, appliance-<slot>, made by '
                    'the appliance), a user name (every slot shares it), or "root" (not for untrusted requests)')
    docker_image: str = opt("appliance-runner:latest", _text, "runner image for the docker backend")
    pids_limit: Auto = opt("auto", _auto_or(_int_at_least(16)),
                           'processes and threads one job may have (a pids cgroup; docker pids_limit), so a fork '
                           'bomb stays in its slot; "auto": 4096, at most an eighth of the host\'s pid_max')
    gpu_share: str = opt("none", _one_of("none", "mps"),
                         'how slots sharing a GPU are held to their GPU memory: "none" (the runner\'s NVML watch '
                         'stops a job over its share), "mps" (also CUDA MPS memory limits; needs the MPS control '
                         'daemon, nvidia-cuda-mps-control -d)')


@dataclass(frozen=True)
class ObjectStoreConfig:
    kind: str = opt("seaweedfs", _one_of("seaweedfs", "minio", "external"),
                    '"seaweedfs": bundled; "minio": run your own MinIO binary; "external": any S3 endpoint')
    host: str = opt("127.0.0.1", _text, "address the bundled store binds to")
    port: int = opt(8333, _port, "S3 port of the bundled store on the host (its other ports stay in its own "
                                 "network namespace)")
    bucket: str = opt("appliance", _text, "bucket for experiment artifacts")
    region: str = opt("us-east-1", _text, "S3 region name")
    endpoint: str = opt("", _text, 'S3 endpoint URL when kind = "external"')
    minio_binary: str = opt("", _text, 'path to a MinIO server binary when kind = "minio"')
    memory_limit: int = opt(parse_size("256MiB"), _size, "soft memory limit of the bundled store (GOMEMLIMIT)")
    retention: float = opt(30 * 86400.0, _duration, '`appliance gc` removes results and unneeded workspaces '
                                                    'older than this (e.g. "30d"; 0 keeps everything)')


@dataclass(frozen=True)
class QueuesConfig:
    submit: str = opt("group", _one_of("open", "group", "closed"),
                      'who may submit through the API: "open" (any local user), "group" (members of the '
                      'appliance group) or "closed" (admins only)')
    admin_group: str = opt("", _text, "members of this group act on every member's jobs as root does "
                                      "(empty: root alone)")
    credentials_dir: str = opt("", _text, "directory of queue credentials (empty: HOME/credentials)")
    dead_ttl: float = opt(30 * 86400.0, _duration,
                          'how long dead-lettered local messages are kept (e.g. "30d"; 0 keeps them forever)')
    unrunnable_after_refusals: int = opt(3, _int_at_least(1),
                                         "on a shared RabbitMQ/SQS queue, a request no slot here can run goes back "
                                         "for other appliances; it is dead-lettered once this many distinct "
                                         "appliances refused it")
    unrunnable_after: float = opt(86400.0, _duration,
                                  'on a shared queue, a request refused by every appliance that saw it for this '
                                  'long since its first refusal is dead-lettered (e.g. "24h"; 0: no age limit)')


@dataclass(frozen=True)
class RunnerConfig:
    python: str = opt("", _text, "run workloads with this interpreter instead of building a virtualenv per pythonenv")
    artifact_cache: int = opt(parse_size("10GiB"), _size, "on-disk cache of immutable artifacts (LRU)")
    venv_cache: int = opt(8, _int_at_least(1), "how many experiment virtualenvs to keep (LRU)")
    installer: str = opt("uv", _one_of("uv", "pip"),
                         '"uv": build virtualenvs with uv from one shared, root-written cache (pip for sets uv '
                         'rejects); "pip": every set with pip as the workload user, no shared cache')
    env_cache: int = opt(parse_size("20GiB"), _size, "size of the shared uv package cache (least recently used "
                                                     "packages are removed)")
    max_unpack: int = opt(parse_size("20GiB"), _size, "largest total size an artifact may unpack to")
    drain_timeout: float = opt(600.0, _duration, "how long a stopping runner lets its job finish")
    default_lifetime: float = opt(86400.0, _duration, "lifetime of a job whose request sets none")
    max_attempts: int = opt(3, _int_at_least(1),
                            "how many times a request may be claimed without finishing (its runner crashed, was "
                            "killed or stopped mid-job) before it is dead-lettered")
    max_interruptions: int = opt(10, _int_at_least(1),
                                 "how many runs of one job may be cut short from outside (its runner killed, its "
                                 "box lost) before it is dead-lettered; counted apart from max_attempts")
    retries: int = opt(2, _int_at_least(0),
                       "how many times a job that failed for the box's fault (class infrastructure) runs again "
                       "before it is dead-lettered; user failures never run again")
    hang_after: float = opt(0.0, _duration,
                            'stop a job with no CPU progress and no new output for this long, as class hung '
                            '(e.g. "30m"; 0: never)')
    warm_interpreter: bool = opt(True, _flag,
                                 "start the next job's Python ahead of time, as the workload's account, so a job "
                                 "like the last one starts without waiting for the interpreter (docs/warm.md)")


@dataclass(frozen=True)
class ControllerConfig:
    debounce: float = opt(0.25, _duration, "quiet time after a change in the credentials directory before re-planning")


NOTIFY_EVENTS = ("job_finished", "job_failed", "job_dead_lettered", "gpu_lost", "gpu_back",
                 "store_down", "store_back", "source_broken", "source_back")


@dataclass(frozen=True)
class Webhook:
    """One receiver of notifications: its URL and the events it wants (see NOTIFY_EVENTS)."""

    url: str
    events: tuple = ("all",)

    def wants(self, event: str) -> bool:
        """"all", the event's own name, or its group (the part before "_": job, gpu, store, source)."""
        return any(e in ("all", event, event.split("_", 1)[0]) for e in self.events)


def _event_names(value: Any) -> tuple:
    names = _text_list(value)
    groups = {e.split("_", 1)[0] for e in NOTIFY_EVENTS}
    for name in names:
        if name not in NOTIFY_EVENTS and name not in groups and name != "all":
            hint = difflib.get_close_matches(name, NOTIFY_EVENTS + tuple(groups), n=1)
            raise ValueError(f"unknown event {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") +
                             f"; events are {', '.join(NOTIFY_EVENTS)}, a group ({', '.join(sorted(groups))}) "
                             "or \"all\"")
    return names or ("all",)


def _url(value: Any) -> str:
    from urllib.parse import urlsplit

    url = _text(value).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url


def _webhooks(value: Any) -> tuple:
    """a list of URLs, or of tables {url = "...", events = [...]}"""
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{value!r} is not a list")
    hooks = []
    for i, item in enumerate(value):
        if isinstance(item, Webhook):
            hooks.append(item)
            continue
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, dict):
            raise ValueError(f"webhook {i + 1} ({item!r}) is neither a URL nor a table with url and events")
        unknown = sorted(set(item) - {"url", "events"})
        if unknown:
            raise ValueError(f"webhook {i + 1} has unknown key(s) {', '.join(unknown)}: a webhook has url and events")
        if "url" not in item:
            raise ValueError(f"webhook {i + 1} has no url")
        hooks.append(Webhook(_url(item["url"]), _event_names(item.get("events", ["all"]))))
    return tuple(hooks)


@dataclass(frozen=True)
class NotifyConfig:
    webhooks: tuple = opt((), _webhooks,
                          'where to POST a JSON message on an event: a list of URLs, or of tables '
                          '{url = "...", events = ["job_failed", "gpu", ...]} (default events: all; '
                          f'events: {", ".join(NOTIFY_EVENTS)}, or a group: job, gpu, store, source). '
                          'A hooks.slack.com URL gets a Slack message ({"text": ...})')
    tries: int = opt(5, _int_at_least(1), "how many times one message is tried (backing off: 1s, 2s, 4s, ...) "
                                          "before it is dropped with a log line")
    timeout: float = opt(5.0, _duration, "how long one webhook call may take")


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = opt("127.0.0.1:9464", _listen,
                      'HOST:PORT where the controller serves Prometheus metrics (/metrics); "" turns them off')


@dataclass(frozen=True)
class Config:
    host: HostConfig = field(default_factory=HostConfig)
    slots: SlotsConfig = field(default_factory=SlotsConfig)
    gpus: GpusConfig = field(default_factory=GpusConfig)
    isolation: IsolationConfig = field(default_factory=IsolationConfig)
    object_store: ObjectStoreConfig = field(default_factory=ObjectStoreConfig)
    queues: QueuesConfig = field(default_factory=QueuesConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def _is_section(f) -> bool:
    return "parse" not in f.metadata


def _build(cls, data: dict, where: str, source: str):
    """Instantiate section `cls` from `data`, validating every key."""
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        f = known.get(key)
        if f is None:
            hint = difflib.get_close_matches(key, known, n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"known keys here: {', '.join(sorted(known))}"
            raise ConfigError(f"{source}: unknown key '{dotted}': {fix}")
        if _is_section(f):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a table ([{dotted}]), not {value!r}")
            values[key] = _build(f.default_factory, value, dotted, source)
        else:
            try:
                values[key] = f.metadata["parse"](_plain(value))
            except ValueError as e:
                raise ConfigError(f"{source}: {dotted} = {_plain(value)!r}: {e}; "
                                  f"expected {f.metadata['help']}") from None
    return cls(**values)


def _plain(value: Any) -> Any:
    """tomlkit items -> plain Python values."""
    return value.unwrap() if hasattr(value, "unwrap") else value


def parse_config(text: str, source: str = "appliance.toml") -> Config:
    try:
        data = tomllib.loads(text)  # reading needs no tomlkit (a runner never loads it)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    return _build(Config, data, "", source)


def load_config(path: Path) -> Config:
    """The config at `path`; all defaults when the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Config()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}; check its permissions") from None
    return parse_config(text, str(path))


def _field_at(dotted: str):
    cls, f = Config, None
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        known = {x.name: x for x in fields(cls)}
        if part not in known:
            where = ".".join(parts[:i]) or "the top level"
            hint = difflib.get_close_matches(part, known, n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown key '{dotted}' ({part!r} is not in {where}): {fix}")
        f = known[part]
        if _is_section(f):
            cls = f.default_factory
    if f is None or _is_section(f):
        raise ConfigError(f"'{dotted}' is a table, not a key; name one of its keys")
    return f


def _toml_value(text: str) -> Any:
    """A CLI value as TOML would read it: numbers and booleans stay typed, else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except Exception:
        return text


def set_value(path: Path, dotted: str, raw: str) -> Any:
    """Set `dotted` (e.g. "slots.cpu.memory") to `raw` in the file, keeping comments.

    The whole file is validated before it is written; a bad value leaves the file as it was.
    """
    f = _field_at(dotted)
    value = _toml_value(raw)
    if isinstance(f.default, tuple) and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        f.metadata["parse"](value)
    except ValueError as e:
        raise ConfigError(f"{dotted} = {raw!r}: {e}; expected {f.metadata['help']}") from None
    import tomlkit  # only here: it keeps the file's comments and layout
    text = path.read_text() if path.exists() else ""
    doc = tomlkit.parse(text)
    *tables, key = dotted.split(".")
    node = doc
    for t in tables:
        if t not in node:
            node[t] = tomlkit.table()
        node = node[t]
    node[key] = value
    new_text = tomlkit.dumps(doc)
    parse_config(new_text, str(path))
    write_atomic(path, new_text)
    return value


def as_dict(config: Any) -> dict:
    """The effective config as nested plain data (for `config show`)."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        out[f.name] = as_dict(value) if _is_section(f) else _leaf(value)
    return out


def _leaf(value: Any) -> Any:
    """A key's value as plain data (a webhook becomes its table)."""
    if isinstance(value, tuple) and any(isinstance(v, Webhook) for v in value):
        return tuple({"url": v.url, "events": list(v.events)} for v in value)
    return value


def describe() -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every key: the source of the commented default file."""
    rows = []

    def walk(cls, prefix):
        for f in fields(cls):
            dotted = f"{prefix}{f.name}"
            if _is_section(f):
                walk(f.default_factory, dotted + ".")
            else:
                rows.append((dotted, f.default, f.metadata["help"]))
    walk(Config, "")
    return rows
