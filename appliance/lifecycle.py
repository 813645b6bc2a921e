"""Bringing an appliance up and down: the engine behind `appliance up`, `down` and `render`.

`up` is safe to repeat: on a running appliance it re-plans and applies only the difference.
If anything fails on the way up, everything it started is stopped again (nothing half-started).
When supervisord is not running, `up` and `down` first stop what a supervisord that died left
behind (appliance/leftovers.py), so no second runner ever runs beside a live one.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from appliance.config import Config, load_config
from appliance.files import write_atomic
from appliance.inventory import Inventory, take_inventory
from appliance.paths import Home
from appliance.plan import Plan, make_plan
from appliance.render import render_default_config, write_supervisord
from appliance.store import mc
from appliance.store.client import check_store, ensure_bucket
from appliance.store.credentials import (client_buckets, ensure_credentials, load_client_credentials, load_credentials,
                                         write_identities)
from appliance.store.server import endpoint_url, ports_in_use, store_program
from appliance import leftovers, supervisor


class StartError(RuntimeError):
    """The appliance could not start; the message names what failed and how to fix it."""


@dataclass(frozen=True)
class Prepared:
    config: Config
    inventory: Inventory
    plan: Plan


def previous_plan(home: Home) -> Plan | None:
    try:
        return Plan.from_json(home.plan_file.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_default_config(home: Home) -> bool:
    """Write a commented appliance.toml for this host unless one exists (never overwrite edits)."""
    if home.config_file.exists():
        return False
    inventory = take_inventory()
    try:
        plan = make_plan(Config(), inventory)
    except ValueError:
        plan = None
    write_atomic(home.config_file, render_default_config(inventory, plan))
    return True


def prepare(home: Home, python: str = sys.executable) -> Prepared:
    """Config, inventory and plan; credentials generated; supervisord.conf and plan.json rendered;
    the queue tree shared with the `appliance` group."""
    home.ensure()
    from appliance.identity import appliance_id
    appliance_id(home)  # made now, before any runner: slots in containers see another host name
    from appliance.jobs.table import db_path
    db_path(home)  # an older home's table moves into jobs/ now: a slot's container sees only that folder
    from appliance.queues.local import share_queue_tree
    note = share_queue_tree(home.studioml_home)
    if note:
        print(f"appliance: {note}", file=sys.stderr)
    write_default_config(home)
    config = load_config(home.config_file)
    inventory = take_inventory()
    plan = make_plan(config, inventory, previous_plan(home))
    bundled = config.object_store.kind == "seaweedfs"
    ensure_credentials(home, with_client=bundled)  # the client identity only where we make identities
    if bundled:
        write_identities(home, config.object_store.bucket)
    write_supervisord(home, config, plan, python)
    return Prepared(config, inventory, plan)


def preflight(home: Home, config: Config, plan: Plan | None = None) -> list[str]:
    """Problems that would make `up` fail, each with its fix. Empty when all is well."""
    problems = []
    if config.isolation.backend == "process" and os.geteuid() != 0:
        problems.append("slots need root to create cgroups and mount a private /dev/shm: run "
                        "`sudo appliance up` (or install as root), or use isolation.backend = \"docker\"")
    if config.isolation.backend == "docker":
        from appliance.slot.docker_slot import docker_problems

        problems += docker_problems(gpus_needed=any(s.gpus for s in plan.slots) if plan else False,
                                    image=config.isolation.docker_image)
    store = store_program(home, config)
    if store is not None and not supervisor.is_running(home):
        busy = ports_in_use(config.object_store.host, store.ports)
        if busy:
            problems.append(f"port(s) {', '.join(map(str, busy))} on {config.object_store.host} are in use, "
                            "and the object store needs them: stop what listens there (`ss -ltnp`) or "
                            "choose another base with `appliance config set object_store.port PORT`")
    return problems


def wait_healthy(home: Home, config: Config, plan: Plan, timeout: float) -> list[str]:
    """Wait until the store answers and every slot is RUNNING; return what is still wrong."""
    creds = load_credentials(home)
    buckets_made = False
    expected = [s.name for s in plan.slots] + ["controller", "api"] + (["store"] if store_program(home, config) else [])
    deadline = time.monotonic() + timeout
    while True:
        problems = []
        states = supervisor.processes(home)
        for name in expected:
            info = states.get(name)
            if info is None:
                problems.append(f"{name}: not known to supervisord")
            elif info.state != "RUNNING":
                problems.append(f"{name}: {info.state} {info.description}".strip())
        if not any(p.startswith("store") for p in problems):
            store_problem = check_store(endpoint_url(config), creds.access_key, creds.secret_key,
                                        config.object_store.bucket, config.object_store.region)
            if not buckets_made and (store_problem is None or "does not exist" in store_problem):
                store_problem = _make_buckets(config, creds)
                buckets_made = store_problem is None
            if store_problem:
                problems.append(f"object store: {store_problem}")
        hopeless = any(states.get(n) and states[n].state in ("FATAL", "EXITED") for n in expected)
        if not problems or hopeless or time.monotonic() > deadline:
            return problems
        time.sleep(0.2)


def _make_buckets(config: Config, creds) -> str | None:
    """Create the appliance's bucket, and on the bundled store every bucket its client identity
    may use (that identity cannot create buckets). What went wrong, or None."""
    store = config.object_store
    buckets = client_buckets(store.bucket) if store.kind == "seaweedfs" else [store.bucket]
    for bucket in buckets:
        try:
            ensure_bucket(endpoint_url(config), creds.access_key, creds.secret_key, bucket, store.region)
        except Exception as e:  # noqa: BLE001 - reported by the caller with the endpoint
            return f"cannot create bucket {bucket}: {e}"
    return None


def place_cgroups(home: Home, foreground: bool) -> None:
    """Decide where the slot cgroups go, and tell every later command (HOME/run/cgroup-parent).

    Under systemd on cgroup v2 (`up --foreground` from the unit) they go below the unit's own,
    delegated cgroup, and supervisord moves into a `supervisor` leaf beside them: v2 allows no
    processes in a cgroup that has controllers enabled for its children. Elsewhere the default
    (`appliance-<hash of the home>`, at the top of each hierarchy) stays. APPLIANCE_CGROUP_PARENT,
    if set, wins.
    """
    from appliance.slot.cgroup import PARENT_ENV, PARENT_FILE, enter_leaf, systemd_delegated_cgroup

    record = home.run_dir / PARENT_FILE
    recorded = record.read_text().strip() if record.exists() else ""
    if os.environ.get(PARENT_ENV, recorded) != recorded or os.geteuid() != 0:
        return  # set by hand: it wins
    unit_cgroup = systemd_delegated_cgroup() if foreground else None
    if unit_cgroup:
        enter_leaf(unit_cgroup, "supervisor")
        os.environ[PARENT_ENV] = unit_cgroup  # inherited by supervisord, the slots and the controller
        write_atomic(record, unit_cgroup + "\n")
    elif not supervisor.is_running(home):
        record.unlink(missing_ok=True)  # a new supervisord outside systemd: the default again
        os.environ.pop(PARENT_ENV, None)


def up(home: Home, foreground: bool = False, timeout: float = 60, say=print) -> Prepared:
    prepared = prepare(home)
    place_cgroups(home, foreground)
    config, plan = prepared.config, prepared.plan
    if not supervisor.is_running(home) and supervisor.supervisord_pid(home) is None:
        stop_leftovers(home, config, say)  # before the port check: a left store holds its ports
    problems = preflight(home, config, plan)
    if problems:
        raise StartError("cannot start the appliance:\n  - " + "\n  - ".join(problems))
    _prepare_slots_environment(home, config)
    if foreground:
        supervisor.start_supervisord(home, foreground=True)  # execs; never returns
    if supervisor.is_running(home):
        added, changed, removed = supervisor.apply_config(home)
        say(f"appliance already running; applied the plan: {len(added)} added, {len(changed)} changed, "
            f"{len(removed)} removed")
    else:
        supervisor.start_supervisord(home)
    problems = wait_healthy(home, config, plan, timeout)
    if problems:
        details = []
        for line in problems:
            name = line.split(":", 1)[0]
            log = supervisor.tail_log(home, name if name != "object store" else "store", 8)
            details.append(line + (f"\n      last lines of logs/{name}.log:\n        " +
                                   log.replace("\n", "\n        ") if log else ""))
        down(home, timeout=30)
        raise StartError("the appliance did not come up, and was stopped again:\n  - " + "\n  - ".join(details))
    write_client_settings(home, config)
    return prepared


def _prepare_slots_environment(home: Home, config: Config) -> None:
    """Before slots start: stale containers go, and every slot's workload account exists (made
    here, on the host, so the docker backend's images need no useradd)."""
    if config.isolation.backend == "docker":
        from appliance.slot.docker_slot import remove_stale

        remove_stale(str(home.root))
    if os.geteuid() != 0:
        return
    from appliance.plan import Plan
    from appliance.slot.users import UserError, workload_user

    plan = Plan.from_json(home.plan_file.read_text())
    for slot in plan.slots:
        try:
            workload_user(config.isolation.user, slot.name)
        except UserError as e:
            raise StartError(str(e)) from None


def write_client_settings(home: Home, config: Config) -> None:
    """The `appliance` alias in ~/.mc/config.json and an env file for boto3 and `aws s3`,
    both with the client identity (never the admin's, unless the store has no other)."""
    env = client_environment(home, config)
    mc.write_alias("appliance", env["AWS_ENDPOINT_URL"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    write_atomic(home.secrets_dir / "s3.env", "".join(f"export {k}={v}\n" for k, v in env.items()), mode=0o600)


def client_environment(home: Home, config: Config) -> dict[str, str]:
    """What boto3, `aws s3` and StudioML's client need to reach the store."""
    creds = load_client_credentials(home)
    return {
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "AWS_ENDPOINT_URL": endpoint_url(config),
        "AWS_DEFAULT_REGION": config.object_store.region,
    }


def down(home: Home, timeout: float | None = None, say=print) -> None:
    """Stop everything: the controller, then slots drain, then the store, then supervisord; clean
    slot cgroups. What a dead supervisord left running is stopped the same way."""
    config = load_config(home.config_file) if home.config_file.exists() else Config()
    from appliance.render import stop_wait_seconds

    if supervisor.is_running(home) or supervisor.supervisord_pid(home):
        supervisor.shutdown(home, timeout or stop_wait_seconds(config) + 60)
    stop_leftovers(home, config, say)
    (home.run_dir / "api.sock").unlink(missing_ok=True)  # clients then say "not running" at once
    if config.isolation.backend == "docker":
        try:
            from appliance.slot.docker_slot import remove_stale

            remove_stale(str(home.root))
        except Exception:  # noqa: BLE001 - docker gone: nothing of ours can be left in it
            pass
    plan = previous_plan(home)
    for slot in plan.slots if plan else ():
        remove_slot_cgroup(slot.name)


def stop_leftovers(home: Home, config: Config, say=print) -> None:
    """Stop what a supervisord that died left running (call only while none runs)."""
    from appliance.render import stop_wait_seconds

    plan = previous_plan(home)
    found = leftovers.find(home, [s.name for s in plan.slots] if plan else [])
    try:
        leftovers.stop(home, found, stop_wait_seconds(config), say)
    except PermissionError as e:
        raise StartError(f"cannot stop {found.describe()}, left running by a supervisord that died: {e}; "
                         "fix: run `appliance down` as the user that started the appliance (root?)") from None


def remove_slot_cgroup(name: str) -> str | None:
    """Remove a stopped slot's empty cgroup (cgroups outlive their processes).

    Returns what went wrong, if anything; a leftover cgroup is harmless and never fatal."""
    if os.geteuid() != 0:
        return None
    from appliance.slot.cgroup import CgroupError, remove_slot

    try:
        remove_slot(name)
    except (CgroupError, OSError) as e:
        return str(e)
    return None




