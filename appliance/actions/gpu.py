"""appliance gpu list|disable|enable: fence a GPU by hand; the choice is kept in appliance.toml
(`gpus.disabled`, by UUID so it follows the card if indexes change) and the running controller
applies it within a moment: a disabled GPU's slot drains and goes, an enabled one gets a slot."""

from __future__ import annotations

from appliance.config import load_config, set_value
from appliance.gpus import DISTANCE_NAMES, scan_gpus


def register(sub):
    p = sub.add_parser("gpu", help="list GPUs, or fence one by hand (disable) and give it back (enable)")
    actions = p.add_subparsers(dest="gpu_action", metavar="list|disable|enable", required=True)
    actions.add_parser("list", help="GPUs NVML sees, and which are disabled").set_defaults(func=run_list)
    for name, text in (("disable", "drain and remove the GPU's slot, and keep it out (gpus.disabled)"),
                       ("enable", "give a disabled GPU a slot again")):
        a = actions.add_parser(name, help=text)
        a.add_argument("gpu", metavar="INDEX|UUID")
        a.set_defaults(func=run, enable=name == "enable")


class GpuError(ValueError):
    pass


def _find(which: str):
    scan = scan_gpus()
    for g in scan.gpus:
        if which == str(g.index) or which == g.uuid:
            return g
    seen = ", ".join(f"{g.index} ({g.uuid})" for g in scan.gpus) or f"none: {scan.problem or 'NVML lists no GPU'}"
    return GpuError(f"no GPU {which} on this host (GPUs: {seen})")


def run_list(args) -> int:
    """Each GPU: its state, MIG devices, the slots of the applied plan on it, and its nearest GPUs."""
    from appliance.lifecycle import previous_plan
    from appliance.units import format_size

    config = load_config(args.home.config_file)
    disabled = set(map(str, config.gpus.disabled))
    scan = scan_gpus()
    plan = previous_plan(args.home)
    if not scan.gpus:
        print(f"no GPUs ({scan.problem or 'NVML lists none'})")
    for g in scan.gpus:
        state = "disabled" if {str(g.index), g.uuid} & disabled else ("ok" if g.healthy else f"UNHEALTHY: {g.problem}")
        print(f"{g.index} {g.uuid} {g.name} {format_size(g.memory_bytes)}: {state}")
        if g.mig_enabled:
            print("    MIG: " + (", ".join(f"{m.uuid} {format_size(m.memory_bytes)}" for m in g.mig_devices)
                                or "no MIG device"))
        for slot in plan.slots if plan else ():
            if g.index in slot.gpu_indexes and (g.uuid in slot.gpus or slot.mig):
                with_ = [i for i in slot.gpu_indexes if i != g.index]
                what = (f"MIG {slot.gpus[0]}" if slot.mig else f"1/{slot.gpu_share} of it" if slot.gpu_share > 1
                        else f"with GPU {','.join(map(str, with_))}" if with_ else "all of it")
                print(f"    {slot.name}: {what}, {format_size(slot.gpu_memory_bytes)} GPU memory")
        near = sorted((link.distance, other.index) for link in scan.links for other in scan.gpus
                      if g.uuid in (link.a, link.b) and other.uuid in (link.a, link.b) and other.uuid != g.uuid)
        if near:
            print("    near: " + ", ".join(f"{i} {DISTANCE_NAMES[d]}" for d, i in near))
    return 0


def run(args) -> int:
    from appliance.actions import UserError

    config_file = args.home.config_file
    disabled = [str(d) for d in load_config(config_file).gpus.disabled]
    found = _find(args.gpu)
    if args.enable:
        names = {args.gpu} | ({str(found.index), found.uuid} if not isinstance(found, GpuError) else set())
        if not names & set(disabled):
            raise UserError(f"GPU {args.gpu} is not disabled (gpus.disabled = {disabled})")
        kept = [d for d in disabled if d not in names]
        verb = "enabled"
    else:
        if isinstance(found, GpuError):
            raise UserError(str(found))
        if {str(found.index), found.uuid} & set(disabled):
            print(f"GPU {found.index} ({found.uuid}) is already disabled")
            return 0
        kept = disabled + [found.uuid]
        verb = "disabled"
    set_value(config_file, "gpus.disabled", repr(kept).replace("'", '"'))
    print(f"GPU {args.gpu} {verb} in {config_file} (gpus.disabled = {kept}); a running appliance's "
          "controller applies it now (its slot drains first when disabling)")
    return 0
