"""Who a workload runs as: never root by default, and never the runner's own uid.

Every request is untrusted code from the network. The runner stays root (it must join
cgroups, unpack archives safely and own the caches), and each workload runs as an unprivileged
account of its own slot (HTCondor's "slot users"), `isolation.user`:

- "auto" (the default; "" means the same): one system account per slot, `appliance-<slot>`
  (e.g. `appliance-slot-0`), created on first use with no home, no shell and no password. Slots
  have different uids, so one workload can neither read another slot's job, signal its
  processes nor look into its `/dev/shm` through `/proc/PID/root`.
- a user name: every workload runs as that existing user. Slots then share a uid and can see
  each other's jobs; `doctor` says so.
- "root": workloads run as root, as they did before. Not for a box that runs other people's
  requests; `doctor` warns.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

AUTO = "auto"
ROOT = "root"
PREFIX = "appliance-"
NOLOGIN = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(p)), "/bin/false")


class UserError(RuntimeError):
    """The workload account cannot be found or made; the message says how to fix it."""


@dataclass(frozen=True)
class WorkloadUser:
    name: str
    uid: int
    gid: int

    @classmethod
    def of(cls, pw) -> "WorkloadUser":
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid)


def account_name(slot: str) -> str:
    """`appliance-slot-0`: the per-slot account (useradd allows 32 characters)."""
    name = PREFIX + slot
    if len(name) > 32:
        raise UserError(f"slot name {slot!r} is too long for an account name ({name!r} has more than 32 "
                        "characters); set isolation.user to an existing user instead")
    return name


def wanted_name(setting: str, slot: str) -> Optional[str]:
    """The account `isolation.user = setting` means for `slot`; None for root."""
    setting = (setting or "").strip()
    if setting in ("", AUTO):
        return account_name(slot)
    if setting in (ROOT, "0"):
        return None
    return setting


def _create(name: str) -> None:
    """useradd a system account; retried, since several runners may start at once."""
    argv = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", NOLOGIN, "--comment", "appliance workload account", name]
    last = ""
    for attempt in range(10):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise UserError(f"cannot create the workload account {name!r}: no `useradd` here; create it "
                            f"(`useradd --system --user-group {name}`) or set isolation.user") from None
        if done.returncode in (0, 9):  # 9: it exists (made by a neighbour just now)
            return
        last = (done.stderr or done.stdout).strip()
        time.sleep(0.1 * (attempt + 1))  # /etc/passwd is locked by another useradd
    raise UserError(f"cannot create the workload account {name!r}: {last}; create it by hand "
                    f"(`useradd --system --user-group {name}`) or set isolation.user")


def workload_user(setting: str, slot: str, create: bool = True) -> Optional[WorkloadUser]:
    """The account this slot's workloads run as (made if it is a missing per-slot account and
    `create`), or None for root."""
    name = wanted_name(setting, slot)
    if name is None:
        return None
    numeric = re.fullmatch(r"(\d+):(\d+)", name)  # uid:gid, resolved by the host (docker backend)
    if numeric:
        return _checked(WorkloadUser(name, int(numeric.group(1)), int(numeric.group(2))))
    try:
        return _checked(WorkloadUser.of(pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)))
    except KeyError:
        pass
    if not (create and name == account_name(slot) and os.geteuid() == 0):
        raise UserError(f"isolation.user: no such user {name!r}; create it, or set isolation.user = \"auto\" "
                        "(an account per slot, made by the appliance)")
    _create(name)
    return _checked(WorkloadUser.of(pwd.getpwnam(name)))


def _checked(user: WorkloadUser) -> Optional[WorkloadUser]:
    return None if user.uid == 0 else user


def executable_by(path: str, uid: int, gid: int) -> bool:
    """Whether user uid:gid may execute `path` (every directory on the way searchable, the file
    executable): a venv made from an interpreter under /root does not run for anyone else."""
    real = os.path.realpath(path)
    parts = real.split("/")
    for i in range(1, len(parts)):
        p = "/".join(parts[:i + 1]) or "/"
        try:
            st = os.stat(p)
        except OSError:
            return False
        bit = 0o001
        if st.st_uid == uid:
            bit = 0o100
        elif st.st_gid == gid:
            bit = 0o010
        if not st.st_mode & bit:
            return False
    return True
