"""The job table: this box's record of every job it has seen, one row per job, kept in SQLite.

`HOME/jobs/jobs.db` (WAL mode, root's, 0600, in a folder of its own so that a slot's container
can mount it whole, -wal and -shm included; an older home's `HOME/jobs.db` is moved in at first
open): only root processes open it (the runners, the API, the controller). A row is made when
the box first sees a job (submitted here, found in a local queue folder, or claimed from a
shared queue) and updated on every state change:

    queued ──> running ──> done | failed | cancelled
      │  ^        │
      v  │        └──> queued   (given back: drained, store down, retried)
     held ──> cancelled
    queued ──> cancelled

A finished job never changes again; `requeue` makes a new row (`requeued_from` = the old key).
Writes are one short transaction each (WAL with synchronous=NORMAL: a commit costs no fsync,
a crash of any process loses nothing committed, a power cut at most the last moments); every
process waits up to `BUSY_MS` for another's write. The schema's version is `PRAGMA
user_version`; `MIGRATIONS` is the one place that changes it, applied in order at open.

A little over 400 lines, on purpose: the schema, its migrations and every query stand in this
one module, so that no other module writes SQL.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Optional

QUEUED, HELD, RUNNING, DONE, FAILED, CANCELLED = "queued", "held", "running", "done", "failed", "cancelled"
ACTIVE = (QUEUED, HELD, RUNNING)
FINISHED = (DONE, FAILED, CANCELLED)
STATES = ACTIVE + FINISHED
BUSY_MS = 5000
DB_NAME = "jobs.db"

# Each entry takes the schema from version i to i + 1. Never edit one that has shipped: add one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE jobs (
        key TEXT PRIMARY KEY,
        owner_uid INTEGER,
        owner TEXT,
        queue TEXT,
        source TEXT,
        message_id TEXT,
        slot TEXT,
        state TEXT NOT NULL,
        class TEXT,
        reason TEXT,
        submitted REAL,
        started REAL,
        ended REAL,
        exit_code INTEGER,
        peak_memory_bytes INTEGER,
        cpu_seconds REAL,
        wall_seconds REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        gpus INTEGER NOT NULL DEFAULT 0,
        array_base TEXT,
        array_index INTEGER,
        array_limit INTEGER,
        requeued_from TEXT,
        cancel_requested REAL,
        updated REAL
    );
    CREATE INDEX jobs_active ON jobs(queue, submitted) WHERE state IN ('queued', 'held', 'running');
    CREATE INDEX jobs_finished ON jobs(ended) WHERE state IN ('done', 'failed', 'cancelled');
    CREATE INDEX jobs_owner_finished ON jobs(owner_uid, ended) WHERE state IN ('done', 'failed', 'cancelled');
    CREATE INDEX jobs_array ON jobs(array_base, array_index) WHERE array_base IS NOT NULL;
    CREATE INDEX jobs_message ON jobs(message_id) WHERE message_id IS NOT NULL;
    CREATE INDEX jobs_owner_started ON jobs(owner_uid, started);
    CREATE TABLE requests (
        key TEXT PRIMARY KEY,
        queue TEXT NOT NULL,
        body BLOB NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class TableError(RuntimeError):
    """The table cannot be used; the message names the file and the fix."""


@dataclass
class Job:
    """One row. Times are epoch seconds; None where the job has not got there."""

    key: str
    state: str
    owner_uid: Optional[int] = None
    owner: Optional[str] = None
    queue: Optional[str] = None
    source: Optional[str] = None
    message_id: Optional[str] = None
    slot: Optional[str] = None
    class_: Optional[str] = None
    reason: Optional[str] = None
    submitted: Optional[float] = None
    started: Optional[float] = None
    ended: Optional[float] = None
    exit_code: Optional[int] = None
    peak_memory_bytes: Optional[int] = None
    cpu_seconds: Optional[float] = None
    wall_seconds: Optional[float] = None
    attempts: int = 0
    gpus: int = 0
    array_base: Optional[str] = None
    array_index: Optional[int] = None
    array_limit: Optional[int] = None
    requeued_from: Optional[str] = None
    cancel_requested: Optional[float] = None
    updated: Optional[float] = None

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        out["class"] = out.pop("class_")
        out.pop("message_id", None)  # the queue's own token: of no use to a user
        return out


_COLUMNS = [f.name for f in fields(Job)]
_SQL_COLUMNS = ", ".join("class" if c == "class_" else c for c in _COLUMNS)


def _row(values) -> Job:
    return Job(**dict(zip(_COLUMNS, values)))


OLD_DB_SUFFIXES = ("-wal", "-shm", "")  # the database last: whoever sees it finds its log beside it


def db_path(home) -> Path:
    """The table of `home`; an older home's `HOME/jobs.db` is moved into the jobs folder first."""
    path = Path(home.root) / "jobs" / DB_NAME
    if not path.exists() and (Path(home.root) / DB_NAME).exists():
        _move_old_table(Path(home.root), path.parent)
    return path


def _move_old_table(root: Path, folder: Path) -> None:
    folder.mkdir(mode=0o700, exist_ok=True)
    for suffix in OLD_DB_SUFFIXES:
        try:
            os.rename(root / (DB_NAME + suffix), folder / (DB_NAME + suffix))
        except FileNotFoundError:  # no log (a clean close), or another process moved it first
            pass


class JobTable:
    """The table at `path`, made (0600) and migrated on first open."""

    def __init__(self, path: "os.PathLike | str"):
        import sqlite3  # ~1.3 MB resident: loaded by the first table opened, not by every importer

        self.path = Path(path)
        old = os.umask(0o077)  # the db and its -wal/-shm files: root's alone
        try:
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=BUSY_MS / 1000, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise TableError(f"{self.path}: cannot use WAL mode (got {mode}); put the home on a local filesystem")
            self.db.execute("PRAGMA synchronous = NORMAL")
            os.chmod(self.path, 0o600)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise TableError(f"{self.path}: {e}; move it aside and the appliance starts a new one") from e
        finally:
            os.umask(old)

    @classmethod
    def of(cls, home) -> "JobTable":
        return cls(db_path(home))

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise TableError(f"{self.path} is schema {version}, newer than this appliance knows "
                             f"({SCHEMA_VERSION}): upgrade the appliance")
        for i in range(version, SCHEMA_VERSION):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if self.db.execute("PRAGMA user_version").fetchone()[0] == i:  # not done by another
                    for statement in MIGRATIONS[i].split(";"):
                        if statement.strip():
                            self.db.execute(statement)
                    self.db.execute(f"PRAGMA user_version = {i + 1}")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ writes

    def _write(self, sql: str, args: Iterable = ()) -> int:
        return self.db.execute(sql, tuple(args)).rowcount

    def add(self, job: Job, body: Optional[bytes] = None) -> bool:
        """Record a job the box sees for the first time; False (and nothing changed) if known.
        `body`: its request, kept so `requeue` can run it again (local queues only)."""
        now = time.time()
        job.updated = now
        if job.submitted is None:
            job.submitted = now
        values = [getattr(job, c) for c in _COLUMNS]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            added = self._write(f"INSERT OR IGNORE INTO jobs ({_SQL_COLUMNS}) VALUES "
                                f"({', '.join('?' * len(_COLUMNS))})", values) == 1
            if added and body is not None and job.queue:
                self._write("INSERT OR REPLACE INTO requests (key, queue, body) VALUES (?, ?, ?)",
                            (job.key, job.queue, body))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return added

    def started(self, key: str, slot: str, attempt: Optional[int] = None, now: Optional[float] = None) -> bool:
        """queued -> running on `slot`; False if it is not queued (held, running, finished, cancelled)."""
        now = now or time.time()
        return self._write(
            "UPDATE jobs SET state = 'running', slot = ?, started = ?, updated = ?, "
            "attempts = COALESCE(?, attempts + 1), ended = NULL, class = NULL, reason = NULL "
            "WHERE key = ? AND state = 'queued'", (slot, now, now, attempt, key)) == 1

    def restarted(self, key: str, slot: str, attempt: Optional[int] = None) -> None:
        """A running job's message came back (its runner died): it runs again on `slot`."""
        now = time.time()
        self._write("UPDATE jobs SET slot = ?, started = ?, updated = ?, attempts = COALESCE(?, attempts + 1) "
                    "WHERE key = ? AND state = 'running'", (slot, now, now, attempt, key))

    def ended(self, key: str, state: str, *, cls: Optional[str] = None, reason: Optional[str] = None,
              exit_code: Optional[int] = None, peak_memory_bytes: Optional[int] = None,
              cpu_seconds: Optional[float] = None, wall_seconds: Optional[float] = None,
              now: Optional[float] = None) -> bool:
        """A job that was not finished ends as `state` (done, failed or cancelled)."""
        if state not in FINISHED:
            raise ValueError(f"{state!r} is not a finished state")
        now = now or time.time()
        return self._write(
            "UPDATE jobs SET state = ?, class = ?, reason = ?, exit_code = ?, peak_memory_bytes = ?, "
            "cpu_seconds = ?, wall_seconds = ?, ended = ?, updated = ? "
            "WHERE key = ? AND state IN ('queued', 'held', 'running')",
            (state, cls, reason, exit_code, peak_memory_bytes, cpu_seconds, wall_seconds, now, now, key)) == 1

    def given_back(self, key: str, reason: str = "") -> bool:
        """running -> queued: it did not end (drained, the store was down, retried later)."""
        return self._write("UPDATE jobs SET state = 'queued', slot = NULL, reason = ?, updated = ? "
                           "WHERE key = ? AND state = 'running'", (reason or None, time.time(), key)) == 1

    def set_message_id(self, key: str, message_id: str) -> None:
        self._write("UPDATE jobs SET message_id = ? WHERE key = ?", (message_id, key))

    def hold(self, key: str) -> bool:
        return self._write("UPDATE jobs SET state = 'held', updated = ? WHERE key = ? AND state = 'queued'",
                           (time.time(), key)) == 1

    def release(self, key: str) -> bool:
        return self._write("UPDATE jobs SET state = 'queued', updated = ? WHERE key = ? AND state = 'held'",
                           (time.time(), key)) == 1

    def cancel(self, key: str, reason: str = "cancelled") -> Optional[str]:
        """A waiting job ends `cancelled` now (it never starts); a running one is marked for its
        runner to stop. Returns the state it was in, or None if it was finished or unknown."""
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute("SELECT state FROM jobs WHERE key = ?", (key,)).fetchone()
            state = row[0] if row else None
            if state in (QUEUED, HELD):
                self._write("UPDATE jobs SET state = 'cancelled', class = 'cancelled', reason = ?, "
                            "ended = ?, updated = ?, cancel_requested = ? WHERE key = ?",
                            (reason, now, now, now, key))
            elif state == RUNNING:
                self._write("UPDATE jobs SET cancel_requested = ?, updated = ? WHERE key = ?", (now, now, key))
            else:
                state = None
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return state

    def forget_requests(self, ended_before: float) -> int:
        """Drop the kept requests of jobs that finished before `ended_before` (their rows stay):
        requeue then says to submit again. Bounds the table's size (a request is ~2-50 KiB)."""
        return self._write("DELETE FROM requests WHERE key IN (SELECT key FROM jobs WHERE state IN "
                           "('done', 'failed', 'cancelled') AND ended < ?)", (ended_before,))

    def cancel_requested(self, key: str) -> bool:
        """Whether someone asked to cancel `key` (the running job's runner asks this each tick)."""
        row = self.db.execute("SELECT cancel_requested FROM jobs WHERE key = ?", (key,)).fetchone()
        return bool(row and row[0])

    # ------------------------------------------------------------------ reads

    def get(self, key: str) -> Optional[Job]:
        row = self.db.execute(f"SELECT {_SQL_COLUMNS} FROM jobs WHERE key = ?", (key,)).fetchone()
        return _row(row) if row else None

    def request_body(self, key: str) -> Optional[tuple[str, bytes]]:
        row = self.db.execute("SELECT queue, body FROM requests WHERE key = ?", (key,)).fetchone()
        return (row[0], bytes(row[1])) if row else None

    def active(self, owner_uid: Optional[int] = None) -> list[Job]:
        """Queued, held and running jobs (of one owner, or all), oldest first."""
        where = "state IN ('queued', 'held', 'running')"
        args: list = []
        if owner_uid is not None:
            where += " AND owner_uid = ?"
            args.append(owner_uid)
        rows = self.db.execute(f"SELECT {_SQL_COLUMNS} FROM jobs INDEXED BY jobs_active WHERE {where} "
                               "ORDER BY queue, submitted", args)
        return [_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """How many jobs are queued, held and running: {state: n}, every active state present."""
        found = dict(self.db.execute("SELECT state, COUNT(*) FROM jobs INDEXED BY jobs_active "
                                     "WHERE state IN ('queued', 'held', 'running') GROUP BY state"))
        return {state: found.get(state, 0) for state in ("queued", "held", "running")}

    def finished_since(self, since: float) -> dict[str, int]:
        """How many jobs are done, failed and cancelled that ended at or after `since`."""
        found = dict(self.db.execute("SELECT state, COUNT(*) FROM jobs INDEXED BY jobs_finished "
                                     "WHERE state IN ('done', 'failed', 'cancelled') AND ended >= ? GROUP BY state",
                                     (since,)))
        return {state: found.get(state, 0) for state in FINISHED}

    def queued_local(self) -> list[tuple]:
        """(key, queue, message id) of the queued jobs of local queues."""
        return self.db.execute("SELECT key, queue, message_id FROM jobs INDEXED BY jobs_active "
                               "WHERE state IN ('queued', 'held', 'running') AND state = 'queued' "
                               "AND source = 'local' AND message_id IS NOT NULL AND queue IS NOT NULL").fetchall()

    def waiting_owners(self, queue: str) -> set:
        rows = self.db.execute("SELECT DISTINCT owner_uid FROM jobs INDEXED BY jobs_active "
                               "WHERE state IN ('queued', 'held', 'running') AND queue = ? AND state = 'queued'",
                               (queue,))
        return {r[0] for r in rows}

    def waiting_in(self, queue: str) -> list[tuple]:
        """(key, owner_uid, submitted, message_id) of the queued jobs of `queue`, oldest first."""
        return self.db.execute("SELECT key, owner_uid, submitted, message_id FROM jobs INDEXED BY jobs_active "
                               "WHERE state IN ('queued', 'held', 'running') AND queue = ? AND state = 'queued' "
                               "ORDER BY submitted", (queue,)).fetchall()

    def finished(self, owner_uid: Optional[int] = None, state: Optional[str] = None,
                 since: Optional[float] = None, limit: int = 100) -> list[Job]:
        """Finished jobs, the latest first."""
        where = ["state IN ('done', 'failed', 'cancelled')"]
        args: list = []
        if owner_uid is not None:
            where.append("owner_uid = ?")
            args.append(owner_uid)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if since is not None:
            where.append("ended >= ?")
            args.append(since)
        args.append(max(1, int(limit)))
        rows = self.db.execute(f"SELECT {_SQL_COLUMNS} FROM jobs WHERE {' AND '.join(where)} "
                               "ORDER BY ended DESC LIMIT ?", args)
        return [_row(r) for r in rows]

    def array(self, base: str) -> list[Job]:
        rows = self.db.execute(f"SELECT {_SQL_COLUMNS} FROM jobs WHERE array_base = ? ORDER BY array_index",
                               (base,))
        return [_row(r) for r in rows]

    def running_in_array(self, base: str, owner_uid: Optional[int]) -> int:
        return self.db.execute("SELECT count(*) FROM jobs WHERE array_base = ? AND owner_uid IS ? "
                               "AND state = 'running'", (base, owner_uid)).fetchone()[0]

    def last_started_by_owner(self, owner_uids: Iterable[int]) -> dict[int, float]:
        """When each owner's latest job started (owners who never started one are left out)."""
        out = {}
        for uid in {u for u in owner_uids if u is not None}:  # one index seek each (max() of an index)
            row = self.db.execute("SELECT max(started) FROM jobs WHERE owner_uid = ?", (uid,)).fetchone()
            if row and row[0] is not None:
                out[uid] = row[0]
        return out

    def knows_message(self, message_id: str) -> bool:
        """Whether a job with this queue message id is in the table (a queue scan adds only new ones)."""
        return self.db.execute("SELECT 1 FROM jobs WHERE message_id = ? LIMIT 1", (message_id,)).fetchone() is not None


def active_counts(home) -> Optional[dict]:
    """Queued, held and running jobs of the appliance at `home` ({state: n}); None when it has no
    table yet or it cannot be read here (a member: the API answers for them). For status and
    /metrics, which must answer whatever the table's state."""
    return read_table(home, JobTable.counts)


def read_table(home, ask):
    """`ask(table)` of the appliance at `home`, opened once; None as for active_counts."""
    if not db_path(home).exists():
        return None
    try:
        table = JobTable.of(home)
    except Exception:  # noqa: BLE001 - not ours to open, or broken
        return None
    try:
        return ask(table)
    except Exception:  # noqa: BLE001
        return None
    finally:
        table.close()
