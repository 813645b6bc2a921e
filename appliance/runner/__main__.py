"""`python -m appliance.runner --home HOME --slot NAME`: one slot's runner (see runner.py).

The slot exec wrapper starts this inside the slot's cgroup; supervisord keeps it running.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from appliance.paths import Home


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m appliance.runner",
                                description="run experiments from the queues in one slot")
    p.add_argument("--home", default=None, help="appliance home (default: APPLIANCE_HOME or "
                                               "the per-user/system default)")
    p.add_argument("--slot", default=os.environ.get("APPLIANCE_SLOT", "dev"),
                   help="slot name (default: APPLIANCE_SLOT, else 'dev')")
    p.add_argument("--exit-when-idle", action="store_true",
                   help="stop when no queue has work (tests, one-off use)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.slot} %(levelname)s %(message)s")
    from appliance.queues.local import LocalQueueSource
    from appliance.runner.runner import Runner, RunnerSettings

    home = Home.at(args.home)
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
