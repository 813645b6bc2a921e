"""appliance config show|set: the effective config, and edits that keep the file's comments."""

import tomlkit

from appliance.config import as_dict, load_config, set_value


def register(sub):
    p = sub.add_parser("config", help="show the effective config, or set one key")
    actions = p.add_subparsers(dest="config_action", metavar="show|set", required=True)
    show = actions.add_parser("show", help="print the effective config (defaults filled in) as TOML")
    show.set_defaults(func=run_show)
    s = actions.add_parser("set", help="set KEY (dotted, e.g. slots.cpu.memory) to VALUE, keeping comments",
                           description="Edit appliance.toml in place. The value is validated first; "
                                       "run `appliance up` to apply it.")
    s.add_argument("key")
    s.add_argument("value")
    s.set_defaults(func=run_set)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def run_show(args) -> int:
    print(f"# effective config of {args.home.config_file}")
    print(tomlkit.dumps(_plain(as_dict(load_config(args.home.config_file)))), end="")
    return 0


def run_set(args) -> int:
    value = set_value(args.home.config_file, args.key, args.value)
    print(f"{args.key} = {value!r} in {args.home.config_file}; `appliance up` applies it")
    return 0
