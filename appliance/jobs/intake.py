"""How a job gets its row: from a request body the box sees (submitted here, dropped into a
local queue folder, claimed from a shared queue).

A request is untrusted: only a few fields are read here, each checked (a JSON object, a
printable key, small whole numbers), and nothing in it is executed or becomes a path. Its
owner is never a request field: the uid that owns the queue file, or the API's peer uid.

Array members carry their place in their environment (`config.env`), which `submit --array`
writes: APPLIANCE_ARRAY_BASE, APPLIANCE_ARRAY_INDEX, APPLIANCE_ARRAY_LIMIT (the `%N` bound).
"""

from __future__ import annotations

import json
import os
import pwd
import re
from pathlib import Path
from typing import Optional

from appliance.jobs.table import QUEUED, Job, JobTable

MAX_KEY_CHARS = 200
MAX_BODY = 4 << 20  # a larger queue file is not read here (the runner says what is wrong with it)
ARRAY_BASE, ARRAY_INDEX, ARRAY_LIMIT = "APPLIANCE_ARRAY_BASE", "APPLIANCE_ARRAY_INDEX", "APPLIANCE_ARRAY_LIMIT"


def owner_name(uid: Optional[int]) -> Optional[str]:
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _small_int(value, low: int = 0, high: int = 1 << 30) -> Optional[int]:
    try:
        n = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return n if low <= n <= high else None


def job_from_request(body: bytes, *, owner_uid: Optional[int], queue: str, source: str,
                     message_id: Optional[str] = None, submitted: Optional[float] = None) -> Optional[Job]:
    """The row for a request body; None when the body has no usable key (the runner
    dead-letters such a message with the reason)."""
    try:
        data = json.loads(body)
        exp = data["experiment"]
        key = exp["key"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or not key.isprintable():
        return None
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    env = config.get("env") if isinstance(config.get("env"), dict) else {}
    resources = exp.get("resources_needed") if isinstance(exp.get("resources_needed"), dict) else {}
    gpus = _small_int(resources.get("gpus", 0), 0, 1024) or 0
    base = env.get(ARRAY_BASE)
    index = _small_int(env.get(ARRAY_INDEX))
    limit = _small_int(env.get(ARRAY_LIMIT), 1)
    if not (isinstance(base, str) and base and len(base) <= MAX_KEY_CHARS and base.isprintable()
            and index is not None):
        base, index, limit = None, None, None
    return Job(key=key, state=QUEUED, owner_uid=owner_uid, owner=owner_name(owner_uid), queue=queue,
               source=source, message_id=message_id, submitted=submitted, gpus=gpus,
               array_base=base, array_index=index, array_limit=limit)


def scan_local_queues(table: JobTable, queue_root: Path, source: str = "local", present: Optional[set] = None) -> int:
    """Add a row for every message waiting in a local queue folder that the table does not know
    (one a StudioML client or an older `submit` wrote straight into the folder): its owner is the
    uid owning the file. Returns how many rows were added; `present` gets (queue, message id)
    of every message seen waiting."""
    added = 0
    try:
        queues = [e for e in os.scandir(queue_root) if e.is_dir(follow_symlinks=False)
                  and e.name.startswith("local")]
    except FileNotFoundError:
        return 0
    waiting = {m for _, _, m in table.queued_local()} if queues else set()
    for q in queues:
        try:
            entries = list(os.scandir(q.path))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith(".") or e.name == "lock.lock" or not e.is_file(follow_symlinks=False):
                continue
            if present is not None:
                present.add((q.name, e.name))
            if e.name in waiting or table.knows_message(e.name):
                continue
            try:
                st = e.stat(follow_symlinks=False)
                if st.st_size > MAX_BODY or st.st_size == 0:
                    continue
                fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                with os.fdopen(fd, "rb") as f:
                    body = f.read(MAX_BODY)
            except OSError:
                continue  # claimed meanwhile
            job = job_from_request(body, owner_uid=st.st_uid, queue=q.name, source=source,
                                   message_id=e.name, submitted=st.st_mtime)
            if job is not None and table.add(job, body):
                added += 1
    return added


def _dead_class(reason: str) -> str:
    m = re.search(r"\[class: ([a-z]+)\]", reason)
    return m.group(1) if m else "unrunnable"


def note_dead_letters(table: JobTable, queue_root: Path, present: Optional[set] = None) -> int:
    """Queued rows of local messages that a runner dead-lettered before they ran (a bad request,
    no slot can run it, too many attempts): failed, with the reason the queue kept. Returns how
    many rows changed."""
    changed = 0
    root = str(queue_root)
    for key, queue, message_id in table.queued_local():
        if "/" in message_id or "/" in queue or message_id.startswith("."):
            continue
        if ((queue, message_id) in present if present is not None
                else os.path.exists(f"{root}/{queue}/{message_id}")):
            continue  # still waiting
        dead = f"{root}/.dead/{queue}/{message_id}"
        if not os.path.exists(dead):
            continue  # claimed: a runner has it
        try:
            with open(f"{dead}.reason", errors="replace") as f:
                reason = f.read(2000).strip()
        except OSError:
            reason = ""
        reason = reason or "dead-lettered"
        if table.ended(key, "failed", cls=_dead_class(reason), reason=f"dead-lettered: {reason}"):
            changed += 1
    return changed
