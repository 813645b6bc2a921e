"""The renderer: supervisord.conf as supervisord itself reads it, the unit, the default config."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jinja2
import pytest
from supervisor.options import ServerOptions

from appliance.config import Config, parse_config
from appliance.gpus import Gpu
from appliance.inventory import Inventory
from appliance.paths import Home
from appliance.plan import make_plan
from appliance.render import _environment_jinja, render_default_config, render_supervisord, render_unit
from appliance.slot.limits import host_pid_max, pids_limit

REPO = Path(__file__).resolve().parent.parent
GiB = 1024**3


def box(gpus=0):
    return Inventory(cpus=tuple(range(8)), memory_bytes=32 * GiB, numa_of_cpu={c: 0 for c in range(8)},
                     gpus=tuple(Gpu(i, f"GPU-{i}", "T4", 16 * GiB, None) for i in range(gpus)))


def supervisord_reads(tmp_path, text: str, home: Home | None = None) -> dict:
    """Parse `text` with supervisord's own option parser: {program name: its config}."""
    (home or Home.at(tmp_path)).ensure()  # it checks that the log directories exist
    conf = tmp_path / "supervisord.conf"
    conf.write_text(text)
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    return {g.name: g.process_configs for g in options.process_group_configs}


def test_one_program_per_slot_each_its_own_group(tmp_path):
    home = Home.at(tmp_path / "h")
    config = parse_config('[host]\nreserved_cpus = 0\n')
    plan = make_plan(config, box(gpus=1))
    text = render_supervisord(home, config, plan, python="/opt/venv/bin/python")
    assert "numprocs" not in text  # an update would restart every slot
    groups = supervisord_reads(tmp_path, text, home)
    slot_names = [s.name for s in plan.slots]
    assert sorted(groups) == sorted(slot_names + ["store", "controller", "api"])
    for slot in plan.slots:
        [program] = groups[slot.name]
        argv = shlex.split(program.command)
        assert argv[:3] == ["/opt/venv/bin/python", "-m", "appliance.slot.exec"]
        assert argv[argv.index("--memory-bytes") + 1] == str(slot.memory_bytes)
        assert argv[argv.index("--shm-bytes") + 1] == str(slot.shm_bytes)
        assert argv[argv.index("--pids-limit") + 1] == str(pids_limit("auto", host_pid_max()))
        assert ("--gpus" in argv) == bool(slot.gpus)
        if slot.gpus:
            assert argv[argv.index("--gpu-memory-bytes") + 1] == str(slot.gpu_memory_bytes) != "0"
        assert argv[-4:] == ["--home", str(home.root), "--slot", slot.name]
        assert program.stopsignal == 15 and program.stopwaitsecs > config.runner.drain_timeout
        assert program.environment["APPLIANCE_HOME"] == str(home.root)
    [store] = groups["store"]
    assert store.environment["GOMEMLIMIT"] == "256MiB"
    assert "-ip.bind=127.0.0.1" in store.command


def test_external_store_runs_nothing_locally(tmp_path):
    config = parse_config('[object_store]\nkind = "external"\nendpoint = "https://s3.example.org"\n')
    groups = supervisord_reads(tmp_path, render_supervisord(Home.at(tmp_path), config, make_plan(config, box())))
    assert "store" not in groups


def test_docker_backend_runs_each_slot_as_a_container(tmp_path):
    config = parse_config('[isolation]\nbackend = "docker"\ndocker_image = "lab/runner:1"\npids_limit = 300\n')
    plan = make_plan(config, box())
    groups = supervisord_reads(tmp_path, render_supervisord(Home.at(tmp_path), config, plan))
    argv = shlex.split(groups[plan.slots[0].name][0].command)
    assert "appliance.slot.docker_slot" in argv and argv[argv.index("--image") + 1] == "lab/runner:1"
    assert argv[argv.index("--pids-limit") + 1] == "300"


def test_a_missing_template_variable_is_an_error():
    with pytest.raises(jinja2.UndefinedError):
        _environment_jinja().get_template("appliance.service.j2").render(home=Home.at("/x"))


def test_the_unit_in_systemd_is_what_the_template_renders_for_the_default_home():
    rendered = render_unit(Home.at("/var/lib/appliance"), Config(), "/usr/local/bin/appliance")
    assert (REPO / "systemd" / "appliance.service").read_text() == rendered


def test_the_default_config_file_documents_every_key_and_means_the_defaults():
    inventory = box(gpus=2)
    text = render_default_config(inventory, make_plan(Config(), inventory))
    assert parse_config(text) == Config()  # every key commented out: the defaults
    uncommented = parse_config("\n".join(line[2:] if re.match(r"# [a-z_]+ = ", line) else line
                                         for line in text.splitlines()))
    assert uncommented == Config()  # and the commented values are the defaults themselves
    assert "8 usable CPUs" in text and "2 GPU(s)" in text


def test_a_home_with_a_percent_sign_is_refused_with_the_fix(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "appliance", "--home", str(tmp_path / "50%"), "status"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "contains '%'" in result.stderr and "Traceback" not in result.stderr


def test_a_changed_runner_setting_changes_every_slot_program_so_up_restarts_the_runners(tmp_path):
    """`config set runner.max_unpack ...` then `up`: supervisord restarts (drains) only programs
    whose config changed, so the runner settings must be part of each slot's program."""
    home = Home.at(tmp_path / "h")
    before_config = parse_config('[host]\nreserved_cpus = 0\n')
    after_config = parse_config('[host]\nreserved_cpus = 0\n[runner]\nmax_unpack = "1GiB"\n')
    plan = make_plan(before_config, box())
    before = supervisord_reads(tmp_path, render_supervisord(home, before_config, plan), home)
    after = supervisord_reads(tmp_path, render_supervisord(home, after_config, plan), home)
    for slot in plan.slots:
        assert before[slot.name][0].environment != after[slot.name][0].environment
    assert before["store"][0].environment == after["store"][0].environment  # the store keeps running
