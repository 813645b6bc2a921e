"""Whether every local user can run the appliance's launcher (members use it without sudo).

An install made with an interpreter under /root (pyenv, conda) leaves a venv others cannot
enter: the launcher then fails for everyone but root. `doctor` finds that by running it as an
unprivileged account (runuser, as root), and says when it cannot try.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass

TRY_AS = ("nobody",)


@dataclass(frozen=True)
class RunCheck:
    ok: bool
    detail: str


def launcher() -> list[str]:
    """The command members type: the installed launcher, else this interpreter's module."""
    found = shutil.which("appliance")
    return [found] if found else [sys.executable, "-m", "appliance"]


def runs_for_others(argv: list[str], user: str | None = None, timeout: float = 60.0) -> RunCheck:
    """Run `argv --version` as an unprivileged account; whether it worked, in one line."""
    if os.geteuid() != 0:
        return RunCheck(True, "not checked: only root can try it as another user")
    if not shutil.which("runuser"):
        return RunCheck(True, "not checked: no runuser here to try it as an unprivileged user")
    for name in [user] if user else TRY_AS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        try:
            done = subprocess.run(["runuser", "-u", name, "--", *argv, "--version"], cwd="/", capture_output=True,
                                  text=True, timeout=timeout, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        except (OSError, subprocess.TimeoutExpired) as e:
            return RunCheck(False, f"cannot try {argv[0]} as {name}: {e}")
        if done.returncode == 0:
            return RunCheck(True, f"{argv[0]} runs for other users (tried as {name})")
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return RunCheck(False, f"{argv[0]} fails for other users (tried as {name}: {why}); members cannot use "
                               "it: re-run ./install.sh with PYTHON=/usr/bin/python3 (an interpreter every user "
                               "can run, not one under /root)")
    return RunCheck(True, "not checked: no unprivileged account (nobody) to try it as")
