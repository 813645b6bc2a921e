"""The `appliance` command: a thin parser over one module per action in appliance/actions/."""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys

from appliance import __version__
from appliance.actions import UserError  # the actions raise it; main() prints it
from appliance.paths import Home

# Each module in appliance.actions has register(subparsers) and sets func=run on its parser.
ACTIONS = ["up", "down", "status", "render", "doctor", "config", "image", "submit", "queue", "gpu", "logs", "results",
           "jobs", "history", "cancel", "hold", "release", "requeue", "wait",
           "top", "user", "gc"]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """All actions, or just `only` when it names one (a quick `appliance submit` imports no
    more than it needs)."""
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Cut this box into pinned slots and run StudioML experiments in them.",
        epilog="The appliance home is --home, else $APPLIANCE_HOME, else /var/lib/appliance (root) "
               "or ~/.local/share/appliance.")
    parser.add_argument("--home", help="appliance home directory (default: $APPLIANCE_HOME or the system default)")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    for name in [only] if only in ACTIONS else ACTIONS:
        importlib.import_module(f"appliance.actions.{name}").register(sub)
    return parser


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for `ls | head -1`'s ls


_quick_exit = False  # the action asked for command()'s quick exit (its parser sets quick_exit=True)


def command() -> int:
    """The `appliance` command itself (pyproject's script, `python -m appliance`): main(), then,
    for an action that asks (submit: it is timed, and it closes every file it writes), an exit
    that skips the interpreter's teardown (~10 ms of freeing, module by module, what the process
    is about to lose anyway) when nothing waits for it: no atexit handler, no other thread.
    Output is flushed first; the exit code is the same."""
    code = main()
    import atexit

    threading = sys.modules.get("threading")  # not imported: no other thread
    if _quick_exit and atexit._ncallbacks() == 0 and (threading is None or threading.active_count() == 1):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            return code  # the usual exit says what went wrong
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    """Every action; a reader that went away (`appliance status --json | head -1`) ends it
    quietly, as it ends git or ls, not with a traceback."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # some other pipe or socket: a real error
        _stdout_to_devnull()
        return SIGPIPE_EXIT


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reading end is closed."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so what is still buffered cannot fail again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _main(argv: list[str] | None) -> int:
    global _quick_exit
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_action_named(argv))
    args = parser.parse_args(argv)
    _quick_exit = bool(getattr(args, "quick_exit", False))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.home = Home.at(args.home)
        # what this process and its children (supervisord, the slots) take as their home,
        # e.g. for the slots' cgroup parent (appliance.slot.cgroup.cgroup_parent)
        os.environ["APPLIANCE_HOME"] = str(args.home.root)

        if getattr(args, "cgroups", True):  # an action that makes none says so (a quick submit)
            from appliance.slot.cgroup import use_recorded_parent

            use_recorded_parent(str(args.home.run_dir))  # where the slot cgroups are (below systemd's unit)
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - known error kinds become one clear line
        if _is_user_error(e):
            print(f"appliance: {e}", file=sys.stderr)
            return 2
        raise


def _action_named(argv: list[str]) -> str | None:
    """The action in `argv` (the first word that is no option nor --home's value)."""
    words = iter(argv)
    for word in words:
        if word == "--home":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _is_user_error(e: Exception) -> bool:
    """Errors whose message already says what is wrong and how to fix it."""
    from appliance.api.client import ApiClientError
    from appliance.config import ConfigError
    from appliance.lifecycle import StartError
    from appliance.paths import HomeError
    from appliance.plan import PlanError
    from appliance.store.credentials import CredentialsError
    from appliance.store.server import StoreError
    from appliance.supervisor import SupervisorError

    return isinstance(e, (UserError, ConfigError, PlanError, StartError, StoreError, CredentialsError,
                          SupervisorError, HomeError, PermissionError, ApiClientError))


if __name__ == "__main__":
    sys.exit(main())
