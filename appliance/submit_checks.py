"""What `submit` refuses before it uploads or queues anything: a request no slot of this box
could ever run (on a local queue, whose only runners are this box's) and requirement lines a
runner would refuse. Pure functions over what the caller read; tests/test_submit_checks.py."""

from __future__ import annotations

from typing import Iterable, Optional

from appliance.studioml.request import Resources, unmet


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
    from appliance.runner.pyenv import BadRequirement, normalized

    try:
        normalized(list(lines))
    except BadRequirement as e:
        return f"{where}: {e}"
    return None
