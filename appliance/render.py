"""Plan -> files: supervisord.conf (one [program:slot-N] per slot), the systemd unit, and the
commented default appliance.toml. Templates live in `templates/`; StrictUndefined makes a
missing variable an error instead of an empty string. Writes are atomic.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config import Config, describe
from appliance.files import write_atomic
from appliance.inventory import Inventory, format_cpu_list
from appliance.paths import Home
from appliance.plan import Plan, Slot, describe_slot
from appliance.singleton import lock_path
from appliance.slot.limits import host_pid_max, pids_limit
from appliance.store.credentials import load_credentials
from appliance.store.server import minio_environment, store_program
from appliance.units import format_size

if TYPE_CHECKING:
    import jinja2


def _templates_dir() -> Path:
    try:
        import appliance.templates as pkg  # installed: templates/ is the package appliance.templates

        return Path(pkg.__file__).parent
    except ImportError:
        return Path(__file__).resolve().parent.parent / "templates"


def _sv(value) -> str:
    """A value for supervisord's ini: '%' would start an expansion, so it is doubled."""
    return str(value).replace("%", "%%")


def _command(argv: list[str]) -> str:
    return _sv(shlex.join(str(a) for a in argv))


def _environment(env: dict[str, str]) -> str:
    def quote(v: str) -> str:
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return _sv(",".join(f"{k}={quote(v)}" for k, v in sorted(env.items())))


def _toml(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, tuple):
        value = list(value)
    import tomlkit
    return tomlkit.item(value).as_string()


def _environment_jinja() -> jinja2.Environment:
    import jinja2  # only while rendering: the controller that imports this module mostly does not
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_templates_dir())),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(sv=_sv, command=_command, environment=_environment, toml=_toml)
    return env


@dataclass(frozen=True)
class Program:
    name: str
    command: list[str]
    environment: dict[str, str]
    description: str = ""


def stop_wait_seconds(config: Config) -> int:
    """supervisord's stopwaitsecs for a slot: the drain timeout plus time to upload."""
    return int(config.runner.drain_timeout) + 60


def runner_settings_digest(config: Config) -> str:
    """A digest of what runners read from the config ([runner], [isolation], [queues]): it sits in
    each slot's environment so that `up` after `config set runner.X` restarts the runners
    (drained: supervisord stops a changed program with its stop signal), not only new ones."""
    import hashlib
    import json

    from appliance.config import as_dict
    wanted = {k: as_dict(getattr(config, k)) for k in ("runner", "isolation", "queues")}
    return hashlib.sha256(json.dumps(wanted, sort_keys=True, default=str).encode()).hexdigest()[:16]


CONTROLLER_LOCK_WAIT_S = 20  # its stopwaitsecs (10) and some
API_LOCK_WAIT_S = 15  # its stopwaitsecs (5) and some
STORE_LOCK_WAIT_S = 30  # its stopwaitsecs (20) and some


def singleton_command(home: Home, name: str, wait_s: float, command: list[str], python: str,
                      log: Path | None = None) -> list[str]:
    """`command` run as the only instance of `name` on this home (appliance/singleton.py)."""
    return [python, "-m", "appliance.singleton", "--lock", lock_path(home.run_dir, name), "--name", name,
            "--wait", str(int(wait_s)), *(["--log", str(log)] if log else []), "--", *command]


def runner_command(home: Home, slot: Slot, python: str) -> list[str]:
    # -OO: no docstrings in a runner's memory (0.9 MB of its ~24; it asserts nothing)
    return [python, "-OO", "-m", "appliance.runner", "--home", str(home.root), "--slot", slot.name]


def slot_program(home: Home, config: Config, slot: Slot, python: str = sys.executable) -> Program:
    """The supervisord program that runs `slot`'s runner inside its isolation."""
    env = {"APPLIANCE_HOME": str(home.root), "PYTHONUNBUFFERED": "1",
           "APPLIANCE_RUNNER_SETTINGS": runner_settings_digest(config)}
    pids = pids_limit(config.isolation.pids_limit, host_pid_max())
    if config.isolation.backend == "docker":
        command = [python, "-m", "appliance.slot.docker_slot", "--slot", slot.name,
                   "--cpus", format_cpu_list(slot.cpus), "--memory-bytes", str(slot.memory_bytes),
                   "--shm-bytes", str(slot.shm_bytes), "--pids-limit", str(pids),
                   "--image", config.isolation.docker_image,
                   "--home", str(home.root), "--stop-timeout", str(int(config.runner.drain_timeout) + 30)]
        if slot.gpus:
            command += ["--gpus", ",".join(slot.gpus)]
        if slot.gpus and slot.gpu_memory_bytes:
            command += ["--gpu-memory-bytes", str(slot.gpu_memory_bytes)]
        command += ["--workload-user", config.isolation.user]
        command += ["--env", "APPLIANCE_HOME=" + str(home.root), "--env", "PYTHONUNBUFFERED=1", "--"]
        command += runner_command(home, slot, "python3")
        command = singleton_command(home, slot.name, stop_wait_seconds(config), command, python)
    else:
        command = [python, "-m", "appliance.slot.exec", "--slot", slot.name,
                   "--cpus", format_cpu_list(slot.cpus), "--mems", format_cpu_list(slot.mems),
                   "--memory-bytes", str(slot.memory_bytes), "--shm-bytes", str(slot.shm_bytes),
                   "--pids-limit", str(pids)]
        if slot.gpus:
            command += ["--gpus", ",".join(slot.gpus)]
        if slot.gpus and slot.gpu_memory_bytes:
            command += ["--gpu-memory-bytes", str(slot.gpu_memory_bytes)]
        # a runner left by a dead supervisord may be draining: wait as long as a drain may take
        command += ["--lock", lock_path(home.run_dir, slot.name), "--lock-wait", str(stop_wait_seconds(config))]
        command += ["--", *runner_command(home, slot, python)]
    return Program(slot.name, command, env, describe_slot(slot))


def controller_program(home: Home, python: str = sys.executable) -> Program:
    command = [python, "-m", "appliance.controller", "--home", str(home.root)]
    return Program("controller", singleton_command(home, "controller", CONTROLLER_LOCK_WAIT_S, command, python),
                   {"APPLIANCE_HOME": str(home.root), "PYTHONUNBUFFERED": "1"})


def api_program(home: Home, python: str = sys.executable) -> Program:
    """The API daemon (appliance/api/server.py): the one door members' clients use."""
    command = [python, "-m", "appliance.api.server", "--home", str(home.root)]
    return Program("api", singleton_command(home, "api", API_LOCK_WAIT_S, command, python),
                   {"APPLIANCE_HOME": str(home.root), "PYTHONUNBUFFERED": "1"})


def render_supervisord(home: Home, config: Config, plan: Plan, python: str = sys.executable,
                       controller: bool = True) -> str:
    store = store_program(home, config)
    if store is not None and config.object_store.kind == "minio":
        store = type(store)(store.command, {**store.environment, **minio_environment(load_credentials(home))},
                            store.ports)
    if store is not None:
        # the store writes its log itself: it must outlive a supervisord that dies (see singleton.py)
        command = singleton_command(home, "store", STORE_LOCK_WAIT_S, store.command, python,
                                    log=home.logs_dir / "store.log")
        store = type(store)(command, store.environment, store.ports)
    return _environment_jinja().get_template("supervisord.conf.j2").render(
        home=home,
        store=store,
        slots=[slot_program(home, config, s, python) for s in plan.slots],
        controller=controller_program(home, python) if controller else None,
        api=api_program(home, python),
        stop_wait=stop_wait_seconds(config),
    )


def render_unit(home: Home, config: Config, appliance_bin: str) -> str:
    return _environment_jinja().get_template("appliance.service.j2").render(
        home=home, appliance_bin=appliance_bin, stop_wait=stop_wait_seconds(config))


def render_default_config(inventory: Inventory, plan: Plan | None) -> str:
    """A commented appliance.toml showing every key with its default, and what was detected."""
    sections: dict[str, list] = {}
    for dotted, default, help_text in describe():
        section, key = dotted.rsplit(".", 1)
        if isinstance(default, int) and key in ("memory_limit", "artifact_cache", "max_unpack", "env_cache"):
            default = format_size(default)
        sections.setdefault(section, []).append((key, default, help_text))
    gpus = (f"{len(inventory.gpus)} GPU(s)" if inventory.gpus
            else f"no GPU ({inventory.gpu_problem or 'none found'})")
    if plan is not None:
        kinds = [s.kind for s in plan.slots]
        summary = (f"{kinds.count('cpu')} CPU slot(s) and {kinds.count('gpu')} GPU slot(s), "
                   f"keeping CPUs {format_cpu_list(plan.reserved_cpus) or 'none'} and "
                   f"{format_size(plan.reserved_memory)} back")
    else:
        summary = "no slot (see `appliance doctor`)"
    return _environment_jinja().get_template("appliance.toml.j2").render(
        sections=list(sections.items()), inventory=inventory, cpu_list=format_cpu_list(inventory.cpus),
        memory=format_size(inventory.memory_bytes), gpus=gpus, plan_summary=summary)


def write_supervisord(home: Home, config: Config, plan: Plan, python: str = sys.executable) -> Path:
    write_atomic(home.supervisord_conf, render_supervisord(home, config, plan, python))
    write_atomic(home.plan_file, plan.to_json())
    return home.supervisord_conf

