"""What `submit` packs and with which environment, and what it refuses, decided before
anything is uploaded or queued: the workspace's entries (appliance/workspace.py, its ignore
files), the project's environment (appliance/studioml/environment.py), a request no slot of this
box could ever run (on a local queue, whose only runners are this box's) and requirement lines
a runner would refuse. Each problem is one line (SubmitRefused). `unrunnable` and
`bad_requirements` are pure (tests/test_submit_checks.py); `pack_plan` reads the folder."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from appliance.studioml.request import Resources, parse_size, unmet
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
        from appliance.studioml.environment import ProjectEnvError, project_env

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


def unrunnable(resources: Resources, shapes: Iterable, disk_bytes: Optional[int]) -> Optional[str]:
    """None when some slot shape (runner.triage.SlotShape: cpus, memory_bytes, gpus,
    gpu_mem_bytes) can run `resources`, else why the closest one cannot; None too when there
    is no plan yet (nothing to judge by)."""
    shapes = sorted(shapes, key=lambda s: (s.gpus, s.memory_bytes, s.cpus), reverse=True)
    if not shapes:
        return None
    reasons = []
    for s in shapes:
        why = unmet(resources, cpus=s.cpus, memory_bytes=s.memory_bytes, gpus=s.gpus,
                    gpu_mem_bytes=s.gpu_mem_bytes, disk_bytes=disk_bytes)
        if why is None:
            return None
        reasons.append((s.name, why))
    name, why = reasons[0]  # the largest slot's reason
    return (f"no slot of this box can run it ({name} {why}"
            + (f", and {len(reasons) - 1} more slot(s) like it" if len(reasons) > 1 else "")
            + "); ask for less, or change the slots (appliance.toml, `appliance config show`)")


def bad_requirements(lines: Iterable[str], where: str) -> Optional[str]:
    """None, or what a runner would say about the requirement lines (it refuses the job);
    `where` names their source for the user ("requirements.txt", "--pip")."""
    lines = list(lines)
    if not lines:
        return None  # (and the requirement parser is not even imported)
    from appliance.pyenv.requirements import BadRequirement, normalized

    try:
        normalized(lines)
    except BadRequirement as e:
        return f"{where}: {e}"
    return None
