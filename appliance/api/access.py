"""Who may do what through the API: pure functions over what the kernel says of the caller.

An admin is root, or a member of `queues.admin_group`. The queue mode (`queues.submit`) says who
else may use the appliance:
  open    any local user may submit and follow their own jobs;
  group   members of the appliance group (install.sh makes it) may; others are refused;
  closed  only admins may submit; members may still follow and fetch what they submitted.
A member acts on their own jobs; an admin on all (`may_act_on`).
"""

from __future__ import annotations

import grp
import pwd

from appliance.paths import SHARED_GROUP

MODES = ("open", "group", "closed")


def group_id(name: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def user_name(uid: int) -> str:
    """The account name of `uid`, or the number itself when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def is_admin(uid: int, groups: list[int], admin_gid: int | None) -> bool:
    return uid == 0 or (admin_gid is not None and admin_gid in groups)


def in_group(groups: list[int], gid: int | None) -> bool:
    return gid is not None and gid in groups


def refusal(who: str, mode: str, name: str, admin: bool, member_of_group: bool,
            group: str = SHARED_GROUP) -> str | None:
    """Why a caller may not call a route meant for `who` under queue mode `mode`; None if they may.

    `member_of_group`: the caller is in the appliance group."""
    if admin or who == "anyone":
        return None
    not_in_group = f"you are not in group {group}; ask an admin: sudo usermod -aG {group} {name}"
    if who == "admin":
        return "this needs an admin (root, or queues.admin_group); ask an admin, or use sudo"
    if mode == "open":
        return None
    if not member_of_group:
        return not_in_group
    if who == "submit" and mode == "closed":
        return ("submitting is closed on this appliance (queues.submit = \"closed\": admins only); "
                "ask an admin to open it: sudo appliance config set queues.submit group")
    return None


def is_member(mode: str, admin: bool, member_of_group: bool) -> bool:
    """Whether the caller may use the appliance at all (follow their jobs) under `mode`."""
    return admin or mode == "open" or member_of_group


def may_act_on(caller_uid: int, admin: bool, owner_uid: int | None) -> bool:
    """A member acts on what they own; an admin on everything (an ownerless thing: admins only)."""
    return admin or (owner_uid is not None and owner_uid == caller_uid)


def owner_only(home, action: str) -> str | None:
    """Why the caller may not run `action` (up, down) on `home` itself: only its owner (root, for
    a lab's home) acts on it directly. None when they may (a missing home is about to be theirs)."""
    import os

    try:
        owner = os.stat(home.root).st_uid
    except OSError:
        return None
    if os.geteuid() in (0, owner):
        return None
    return (f"`{action}` needs root (the appliance at {home.root} belongs to {user_name(owner)}): ask an "
            f"admin to run 'sudo appliance {action}'")
