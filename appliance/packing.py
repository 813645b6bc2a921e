"""What `submit` packs and with which environment, decided before anything is uploaded or
queued: the workspace's entries (appliance/workspace.py, its ignore files), the project's
environment (appliance/project_env.py), and the refusals that must come now rather than from
a runner later (appliance/submit_checks.py). Each problem is one line (SubmitRefused)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from appliance.project_env import ProjectEnvError, project_env
from appliance.studioml.request import Resources, parse_size
from appliance.submit_checks import bad_requirements, unrunnable
from appliance.workspace import walk


class SubmitRefused(ValueError):
    """Nothing is uploaded or queued; the message says why and what to do."""


@dataclass
class Packing:
    entries: list
    pythonenv: list = field(default_factory=list)
    pythonver: str = "%d.%d" % sys.version_info[:2]


def _say(text: str) -> None:
    print(f"appliance submit: {text}", file=sys.stderr)


def pack_plan(home, args, workdir: Path, script: Path, resources: dict) -> Packing:
    entries = walk(workdir, on_skip=lambda rel, why: _say(f"left out {rel}: {why}"),
                   gitignore=not args.no_gitignore)
    if script.as_posix() not in {e.rel for e in entries}:
        raise SubmitRefused(f"{args.script}: left out by an ignore file (.applianceignore or "
                            ".gitignore), so the job would not have it; un-ignore it with a "
                            f"line '!{script.as_posix()}' in .applianceignore")
    _check_resources(home, resources)
    problem = bad_requirements(args.pip, "--pip")
    if problem:
        raise SubmitRefused(problem)
    packing = Packing(entries)
    if args.freeze or args.no_freeze:
        pythonenv = []
    else:
        try:
            env, packing.pythonver = project_env(workdir, entries, args.python)
        except ProjectEnvError as e:
            raise SubmitRefused(str(e)) from None
        except (OSError, ValueError) as e:
            raise SubmitRefused(f"--python {args.python}: cannot read its packages ({e}); "
                                "use --no-freeze with --pip, or point --python at your "
                                "interpreter") from None
        for what, why in env.skipped:
            _say(f"not sent: {what} ({why})")
        if env.missing:
            _say(f"imported but not installed in {args.python}, not sent: "
                 f"{', '.join(env.missing)} (add them with --pip or a requirements.txt)")
        pythonenv = env.requirements
        problem = bad_requirements(pythonenv, env.source)
        if problem:
            raise SubmitRefused(problem)
        _say(env.describe(extra=len(args.pip)))
    packing.pythonenv = pythonenv
    return packing


def _check_resources(home, resources: dict) -> None:
    """A request no slot of this box can run is refused now (a local queue's only runners are
    this box's), as the runner would dead-letter it later."""
    from appliance.runner.triage import slot_shapes

    want = Resources(cpus=int(resources["cpus"]), gpus=int(resources["gpus"]),
                     ram_bytes=parse_size(resources["ram"], "--ram") if resources["ram"] else 0,
                     hdd_bytes=parse_size(resources["hdd"], "--hdd") if resources["hdd"] else 0,
                     gpu_mem_bytes=parse_size(resources["gpuMem"], "--gpu-mem")
                     if resources["gpuMem"] else 0)
    try:
        disk = shutil.disk_usage(home.work_dir if Path(home.work_dir).exists() else home.root).total
    except OSError:
        disk = None
    why = unrunnable(want, slot_shapes(home), disk)
    if why:
        raise SubmitRefused(why)
