"""`appliance doctor`: look at everything the appliance relies on; each problem with its fix."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from appliance import supervisor
from appliance.config import Config, ConfigError, load_config
from appliance.gpus import scan_gpus
from appliance.notify import doctor_rows as notify_rows
from appliance.paths import Home
from appliance.store.health import store_problem
from appliance.store.server import StoreError, endpoint_url, ports_in_use, store_program, weed_binary


@dataclass(frozen=True)
class Finding:
    ok: bool
    what: str
    detail: str  # on a problem: what is wrong and the fix


def check(home: Home) -> list[Finding]:
    out: list[Finding] = []
    try:
        config = load_config(home.config_file)
        out.append(Finding(True, "config", str(home.config_file)))
    except ConfigError as e:
        return [Finding(False, "config", str(e))]

    out += _check_permissions(home)
    out.append(Finding(*_launcher_for_members()))
    out.append(_check_disk(home))
    if config.runner.installer == "uv" and not config.runner.python:
        out.append(_check_env_cache(home))
    out.append(_check_workload_user(config))
    out += _check_cgroups(home, config)
    out += _check_store(home, config)
    out.append(_check_metrics(home, config))
    scan = scan_gpus()
    if scan.gpus:
        bad = [g for g in scan.gpus if not g.healthy]
        out.append(Finding(not bad, "gpus", f"{len(scan.gpus)} GPU(s) via NVML" + (
            "; unhealthy: " + ", ".join(f"{g.index} ({g.problem})" for g in bad) +
            ": their slots are left out; check `nvidia-smi -q`" if bad else "")))
    else:
        out.append(Finding(True, "gpus", f"none: {scan.problem or 'NVML lists no GPU'} (CPU slots only)"))
    if config.isolation.gpu_share == "mps":
        from appliance.runner.gpu import mps_pipe_dir, mps_problem

        problem = mps_problem(os.environ)
        out.append(Finding(not problem, "gpu share", problem or f"MPS control daemon in {mps_pipe_dir(os.environ)}"))
    out += [Finding(*row) for row in notify_rows(home, config)]
    if config.isolation.backend == "docker":
        from appliance.slot.docker_slot import docker_problems

        problems = docker_problems(gpus_needed=bool(scan.gpus), image=config.isolation.docker_image)
        out.append(Finding(not problems, "docker", "; ".join(problems) or "daemon reachable"))
    return out


def _launcher_for_members() -> tuple:
    from appliance.everyone import launcher, runs_for_others

    result = runs_for_others(launcher())
    return result.ok, "launcher", result.detail


def _check_permissions(home: Home) -> list[Finding]:
    out = []
    if home.root.exists() and not os.access(home.root, os.W_OK):
        out.append(Finding(False, "home", f"{home.root} is not writable by uid {os.geteuid()}: run as its owner "
                                          "or with sudo"))
    secrets = [p for p in (home.store_credentials, home.store_identities) if p.exists()]
    loose = [p for p in secrets if p.stat().st_mode & 0o077]
    if loose:
        out.append(Finding(False, "secrets", f"{', '.join(map(str, loose))} readable by others: "
                                             f"chmod 600 {' '.join(map(str, loose))}"))
    elif secrets:
        out.append(Finding(True, "secrets", "store credentials are private (0600)"))
    out += _check_records(home)
    return out


def _check_records(home: Home) -> list[Finding]:
    """The job table (every request, with its owner's store keys) and the ledger: root's alone."""
    folders = [p for p in (home.jobs_dir, home.ledger_dir) if p.is_dir()]
    if not folders:
        return []
    loose = [p for p in folders if p.stat().st_mode & 0o077]
    loose += [p for p in home.jobs_dir.glob("jobs.db*") if p.stat().st_mode & 0o077]
    if loose:
        return [Finding(False, "records", f"{', '.join(map(str, loose))} open to others (the job table holds every "
                                          f"request with its owner's store keys): chmod go= "
                                          f"{' '.join(map(str, loose))}")]
    return [Finding(True, "records", "the job table and the ledger are private (0700)")]


def _check_disk(home: Home) -> Finding:
    import shutil

    from appliance.runner.settle import DISK_FULL_BYTES
    from appliance.units import format_size

    where = home.root if home.root.exists() else home.root.parent
    usage = shutil.disk_usage(where)
    if usage.free < DISK_FULL_BYTES:
        return Finding(False, "disk", f"the disk holding {home.root} is full ({format_size(usage.free)} free): jobs "
                                      "are put back until there is room; free space (`du -sh HOME/*`), or lower "
                                      "runner.artifact_cache")
    return Finding(True, "disk", f"{format_size(usage.free)} free of {format_size(usage.total)}")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_env_cache(home: Home) -> Finding:
    """uv links venvs to its cache (hard links or clones): both must be on one filesystem."""
    from appliance.pyenv import uv_binary

    if uv_binary() is None:
        return Finding(False, "env cache", "runner.installer is \"uv\" but uv is not installed: `pip install uv` "
                                           "into the appliance's environment, or `appliance config set "
                                           "runner.installer pip`")
    cache, venvs = _existing(home.uv_cache), _existing(home.venv_cache)
    if os.stat(cache).st_dev != os.stat(venvs).st_dev:
        return Finding(False, "env cache", f"the uv cache {home.uv_cache} and the venvs {home.venv_cache} are on "
                                           "different filesystems, so every package is copied instead of linked: "
                                           "keep both on one filesystem (mount or symlink the whole "
                                           f"{home.cache_dir} instead of one of them)")
    return Finding(True, "env cache", f"uv cache {home.uv_cache} on the venvs' filesystem")


def _check_workload_user(config: Config) -> Finding:
    """Every request is untrusted code: say plainly when workloads are not kept apart."""
    from appliance.slot.users import wanted_name

    setting = config.isolation.user.strip()
    if wanted_name(setting, "slot-0") is None:
        return Finding(False, "workload user", 'isolation.user = "root": every request runs as root and can read '
                                               "the store's keys and other jobs; set it to \"auto\"")
    if setting not in ("", "auto"):
        return Finding(True, "workload user", f"every slot runs workloads as {setting!r}: slots share a uid and can "
                                              'read each other\'s jobs ("auto" gives each slot its own account)')
    return Finding(True, "workload user", "an unprivileged account per slot (appliance-<slot>)")


def _check_metrics(home: Home, config: Config) -> Finding:
    from appliance.metrics import doctor_finding

    ok, detail = doctor_finding(home, config, supervisor.is_running(home))
    return Finding(ok, "metrics", detail)


def _check_cgroups(home: Home, config: Config) -> list[Finding]:
    from appliance.slot.cgroup import CgroupError, cgroup_parent, cgroup_version

    version = cgroup_version()
    if config.isolation.backend == "docker":
        return [Finding(True, "cgroups", f"{version} (docker does the isolation)")]
    if os.geteuid() != 0:
        return [Finding(False, "cgroups", f"{version}, but not root: slots cannot get their own cgroup or "
                                          "/dev/shm; run `sudo appliance up` or use isolation.backend = \"docker\"")]
    if version == "none":
        return [Finding(False, "cgroups", "no cgroup filesystem mounted: mount cgroup2 on /sys/fs/cgroup")]
    if version in ("v1", "hybrid"):
        missing = [c for c in ("cpuset", "memory") if not Path(f"/sys/fs/cgroup/{c}").is_dir()]
    else:
        controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
        missing = [c for c in ("cpuset", "memory") if c not in controllers]
    if missing:
        return [Finding(False, "cgroups", f"{version} without the {', '.join(missing)} controller(s): enable them "
                                          "(kernel cmdline cgroup_enable=memory, or systemd Delegate=yes)")]
    try:
        parent = cgroup_parent(str(home.root))
    except CgroupError as e:
        return [Finding(False, "cgroups", str(e))]
    return [Finding(True, "cgroups", f"{version} with cpuset and memory; this appliance's slots under /{parent}")]


def _check_store(home: Home, config: Config) -> list[Finding]:
    out = []
    try:
        program = store_program(home, config)
        if config.object_store.kind == "seaweedfs":
            out.append(Finding(True, "store binary", weed_binary()))
    except StoreError as e:
        return [Finding(False, "store", str(e))]
    running = supervisor.is_running(home)
    if program is not None and not running:
        busy = ports_in_use(config.object_store.host, program.ports)
        out.append(Finding(not busy, "ports", f"port(s) {', '.join(map(str, busy))} taken: free them or "
                                              "`appliance config set object_store.port PORT`" if busy else
                           f"store ports {program.ports[0]}..{program.ports[-1]} free"))
    if running or program is None:
        problem = store_problem(home, config)
        out.append(Finding(problem is None, "store", problem or
                           f"{endpoint_url(config)} answers with our keys and takes a write"))
    else:
        out.append(Finding(True, "store", "not running (start with `appliance up`)"))
    return out
