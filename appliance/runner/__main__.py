"""`python -m appliance.runner --home HOME --slot NAME`: one slot's runner (see runner.py).

The slot exec wrapper starts this inside the slot's cgroup; supervisord keeps it running.
"""

from __future__ import annotations

import logging
import os
import sys


def _dataclasses_without_inspect() -> None:
    """Import dataclasses with a stand-in for `inspect`, which it uses for one thing only: a
    class's signature, for the docstring it writes when a class has none (every class under
    -OO). `inspect` and what it imports (ast, dis, ...) are ~1.2 MB of every runner's memory for
    good; the stand-in has no signatures, so a dataclass's __doc__ reads "Name(...)". It is taken
    away at once: whatever imports `inspect` later gets the real one."""
    if "dataclasses" in sys.modules or "inspect" in sys.modules:
        return
    import types

    def signature(_obj, *_args, **_kwargs) -> str:
        return "(...)"

    stand_in = types.ModuleType("inspect")
    stand_in.signature = signature
    sys.modules["inspect"] = stand_in
    try:
        import dataclasses  # noqa: F401
    finally:
        del sys.modules["inspect"]


_dataclasses_without_inspect()

from appliance.paths import Home  # noqa: E402


USAGE = """usage: python -m appliance.runner [--home HOME] [--slot NAME] [--exit-when-idle] [-v]

run experiments from the queues in one slot

options:
  --home HOME       appliance home (default: APPLIANCE_HOME or the per-user/system default)
  --slot NAME       slot name (default: APPLIANCE_SLOT, else 'dev')
  --exit-when-idle  stop when no queue has work (tests, one-off use)
  -v, --verbose     log more
  -h, --help        show this help and exit
"""


class Args:
    def __init__(self) -> None:
        self.home = None
        self.slot = os.environ.get("APPLIANCE_SLOT", "dev")
        self.exit_when_idle = self.verbose = False


def parse(argv: list[str]) -> Args:
    """The runner's options, with getopt: argparse (and its gettext) would stay in every runner's
    memory for good, ~0.3 MB of each slot, for a command line supervisord writes."""
    import getopt

    args = Args()
    try:
        opts, rest = getopt.gnu_getopt(argv, "hv", ["home=", "slot=", "exit-when-idle", "verbose", "help"])
        if rest:
            raise getopt.GetoptError(f"unrecognized arguments: {' '.join(rest)}")
    except getopt.GetoptError as e:
        print(f"{USAGE.splitlines()[0]}\npython -m appliance.runner: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    for name, value in opts:
        if name in ("-h", "--help"):
            print(USAGE, end="")
            raise SystemExit(0)
        if name == "--home":
            args.home = value
        elif name == "--slot":
            args.slot = value
        elif name == "--exit-when-idle":
            args.exit_when_idle = True
        elif name in ("-v", "--verbose"):
            args.verbose = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.slot} %(levelname)s %(message)s")
    from appliance.queues.local import LocalQueueSource
    from appliance.runner.runner import Runner, RunnerSettings

    home = Home.at(args.home)
    if not home.root.is_dir():  # a typo would otherwise become a new, empty home that runs nothing
        print(f"appliance runner: there is no appliance home at {home.root}: give --home the folder "
              f"`appliance up` made (or make one with `appliance up --home {home.root}`)", file=sys.stderr)
        return 2
    settings = RunnerSettings()
    if home.config_file.exists():
        from appliance.config import ConfigError, load_config
        try:
            settings = RunnerSettings.from_config(load_config(home.config_file))
        except ConfigError as e:
            print(f"appliance runner: {e}", file=sys.stderr)
            return 2
    home.queue_root.mkdir(parents=True, exist_ok=True)
    # the local queue plus every entry of the credentials directory, followed live
    from appliance.queues.sources import SourceSet
    from appliance.config import Config, load_config as _load
    logging.getLogger("pika").setLevel(logging.WARNING)
    config = _load(home.config_file) if home.config_file.exists() else Config()
    from appliance.store.server import own_s3_socket
    own_socket = own_s3_socket(home, config)
    if settings.own_store and own_socket is not None:
        from appliance.store import lite
        lite.reach_through(settings.own_store, str(own_socket))
    sources = [SourceSet(home, config, slot=args.slot,
                         local=LocalQueueSource(home.queue_root, runner_id=args.slot,
                                                dead_ttl_s=config.queues.dead_ttl))]
    runner = Runner(home, args.slot, sources, settings)
    runner.install_signals()
    return runner.run_forever(exit_when_idle=args.exit_when_idle)


if __name__ == "__main__":
    raise SystemExit(main())
