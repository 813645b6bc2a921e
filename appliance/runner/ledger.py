"""The exactly-once ledger: everything that decides whether a request has run and is settled.

Where it lives (ledger_stores.py): one record per request, named by (bucket of the request's
workspace, experiment key), on this box (HOME/ledger, root's alone) and in the appliance's own
store (bucket `appliance-ledger`, written and read with the appliance's admin identity, which no
client key can write). The result record the runner also writes beside a job's outputs in the
client's bucket (`experiments/<key>/appliance-result.json`) is a copy for users to read; it is
never read back as truth, since every submitter can write there. A planted one changes nothing.
A job's folder on the box is named by the same (bucket, key) (`job_folder`).

States of a record:
- running: appliance id, host, slot, attempt, started, and a heartbeat refreshed while it runs
  (every runner.keepalive, ~1 min); `interruptions` counts the runs of it that a kill from
  outside cut short (a runner SIGKILLed, a box that died).
- ended: the workload ended (outcome, class, exit code, reason, report); its outputs are on
  their way to the store. With JOB/.ended.json on this box, whoever finds the job dir unlocked
  finishes the uploads (`resume_finished`); it never runs again.
- done / failed: final. Its outputs are in the store; success is done, anything else failed.
  A local queue's message (only this box can claim it) has its running and ended records on this
  box alone; the store gets its final one (and any release), which is what other boxes go by.
- released: the runner gave the message back itself (drained, retried, store down, runner
  error); the next claim runs it, and it is no interruption.
- cancel (a field beside the state, set by `record_cancel`): whichever box claims the request
  next settles it unrun (acked, outcome cancelled). Only a request not yet run can be cancelled.

The claim path (`decide`, pure; the runner's triage acts on it): a final record settles the
message as it ended; a cancelled one is acked unrun; a request whose job runs now (on
this box: its job folder's lock is held; on another box: a running record with a fresh
heartbeat) is HELD (given back uncounted, looked at again later) until the running one settles:
that is how a redelivery (a RabbitMQ restart, an SQS visibility timeout) never starts a second
run. A running record whose runner is gone (this appliance's, lock free; another's, heartbeat
stale) was interrupted: counted in `interruptions` (runner.max_interruptions), not in the
attempts the job's own failures use (runner.max_attempts).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from appliance.runner import classes
from appliance.runner.ledger_stores import LedgerUnavailable, LocalLedger, StoreLedger, entry_name
from appliance.studioml import transfer
from appliance.studioml.artifacts import result_record
from appliance.studioml.keys import job_dir_name
from appliance.studioml.request import parse_request
from appliance.studioml.transfer import ArtifactError, RetryPolicy, StoreUnavailable
from appliance.studioml.uploader import Uploader

log = logging.getLogger("appliance.runner")

RUNNING, ENDED_STATE, DONE, FAILED, RELEASED = "running", "ended", "done", "failed", "released"
FINAL = (DONE, FAILED)

# what the claim path does with a request (decide)
RUN, SETTLE, CANCEL, HOLD, INTERRUPTED = "run", "settle", "cancel", "hold", "interrupted"


def decide(record: Optional[dict], *, running_here: bool, me: str, now: float, stale_s: float,
           store_wait_s: float, finished_here: bool = False) -> str:
    """What a claim does with a request whose ledger record is `record`."""
    if record is None:
        return RUN if not running_here else HOLD
    state = record.get("state")
    if state in FINAL:
        return SETTLE
    if record.get("cancel"):
        return CANCEL
    if running_here:
        return HOLD
    if state in (RUNNING, ENDED_STATE):
        mine = record.get("appliance") == me
        if not mine and now - float(record.get("heartbeat") or 0) < stale_s:
            return HOLD  # it runs (or uploads) on another box
        if state == ENDED_STATE and not mine and not finished_here \
                and now - float(record.get("finished") or 0) < store_wait_s:
            return HOLD  # its outputs wait on a box that went quiet: give it runner.store_wait
        return INTERRUPTED
    return RUN


def over_limits(attempt: int, record: Optional[dict], max_attempts: int, max_interruptions: int) -> Optional[str]:
    """The dead-letter reason when a claim (attempt `attempt`) is past the limits, else None.
    Interruptions are counted apart from the attempts the job's own failures use."""
    interruptions = int((record or {}).get("interruptions") or 0)
    if interruptions > max_interruptions:
        return (f"interrupted {interruptions} times: its runner was killed from outside each time "
                f"(the limit is runner.max_interruptions = {max_interruptions}) [class: {classes.INFRASTRUCTURE}]")
    attempts = attempt - interruptions
    if attempts > max_attempts:
        extra = f", besides {interruptions} interruption(s)" if interruptions else ""
        return (f"claimed {attempts - 1} times without finishing{extra} (the limit is runner.max_attempts = "
                f"{max_attempts}): it crashed or outlived its runner each time [class: {classes.INFRASTRUCTURE}]")
    return None


def settlement(record: dict) -> tuple:
    """How a message whose request ended as `record` says is settled: ("ack",) or
    ("dead_letter", reason with its class)."""
    outcome, reason = record.get("outcome") or "failed", record.get("reason", "")
    if outcome == "success":
        return ("ack",)
    cls = record.get("class") or classes.classify(outcome, record.get("exit_code"), reason)
    return ("dead_letter", f"{outcome}: {reason} [class: {cls}]")


def settle_from(verdict: str, record: Optional[dict], src, msg, key: str, status, held_logged: dict,
                ended=None) -> str:
    """Act on a claim-path verdict other than RUN: "held" (HOLD: give it back uncounted, logged
    once a minute per request in `held_logged`) or "settled" (CANCEL: acked unrun; SETTLE: as
    the record says it ended). `status` is the slot's StatusFile; `ended(outcome, cls,
    exit_code, reason)` tells the job table."""
    if verdict == HOLD:  # it runs now: this copy waits (uncounted) until that run settles
        if time.time() - held_logged.get(key, 0) > 60:
            held_logged.clear()
            held_logged[key] = time.time()
            log.info("holding %s/%s: %s runs it now", msg.queue, key,
                     f"{record.get('host')}/{record.get('slot')}" if record else "this box")
        return "held"
    if verdict == CANCEL:  # cancelled before it ran: settled unrun, acked
        why = cancel_reason(record)
        log.info("%s: %s; settling it unrun", key, why)
        src.ack(msg)
        status.job_finished("cancelled", None, why, cls="cancelled")
        if ended:
            ended("cancelled", "cancelled", None, why)
        return "settled"
    how = settlement(record)  # SETTLE: it ran before; settle it as it ended
    log.info("%s already ran (%s): settling without running it again", key, record.get("outcome"))
    getattr(src, how[0])(msg, *how[1:])
    outcome, why = record.get("outcome") or "failed", f"already ran: {record.get('reason', '')}".strip()
    status.job_finished(outcome, record.get("exit_code"), why)
    if ended:
        ended(outcome, record.get("class"), record.get("exit_code"), why)
    return "settled"


def entry_of(req) -> tuple:
    """(bucket, key) naming `req`'s record: the bucket of its workspace, its experiment key."""
    arts = req.artifacts
    ws = arts.get("workspace") or next(iter(arts.values()), None)
    return (ws.bucket if ws is not None else ""), req.key


def _newer(a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
    if a is None or b is None:
        return a or b
    fa, fb = a.get("state") in FINAL, b.get("state") in FINAL
    out = (a if fa else b) if fa != fb else (a if float(a.get("updated") or 0) >= float(b.get("updated") or 0) else b)
    cancel = a.get("cancel") or b.get("cancel")
    return {**out, "cancel": cancel} if cancel and not out.get("cancel") else out


class Ledger:
    """The records of one appliance: this box's, and its store's when it has one."""

    def __init__(self, local: LocalLedger, store: Optional[StoreLedger] = None, me: str = "",
                 stale_s: float = 180.0):
        self.local, self.store, self.me, self.stale_s = local, store, me, stale_s

    @classmethod
    def for_home(cls, home, config=None, me: str = "", stale_s: float = 180.0) -> "Ledger":
        if config is None:
            from appliance.config import Config, ConfigError, load_config
            try:
                config = load_config(home.config_file) if Path(home.config_file).exists() else Config()
            except ConfigError:
                config = Config()
        store = StoreLedger.for_home(home, config)
        return cls(LocalLedger(home.ledger_dir), store, me, stale_s)

    def read(self, bucket: str, key: str) -> Optional[dict]:
        name = entry_name(bucket, key)
        record = self.local.read(name)
        if self.store is not None and (record or {}).get("state") not in FINAL:
            try:
                record = _newer(record, self.store.read(name))
            except LedgerUnavailable as e:
                log.warning("%s: the store ledger did not answer (%s); going by this box's", key, e)
        if record is not None and (record.get("experiment") != key or record.get("bucket") != bucket):
            return None  # not this request's (cannot happen unless someone wrote it by hand)
        return record

    def write(self, record: dict, share: bool = True) -> dict:
        """Record it on this box, and in the store unless not `share` yet (then `share` it later)."""
        record = {**record, "updated": time.time()}
        name = entry_name(record["bucket"], record["experiment"])
        before = self.local.read(name)
        if before and before.get("cancel") and not record.get("cancel"):
            record["cancel"] = before["cancel"]
        try:
            self.local.write(name, record, durable=record.get("state") in FINAL or bool(record.get("cancel")))
        except OSError as e:  # a full disk: the store copy (and the job folder) still tell
            log.warning("%s: ledger record not written on this box: %s", record["experiment"], e)
        if share:
            self.share(record)
        return record

    def share(self, record: dict) -> None:
        """The store's copy of `record` (what other boxes on this store go by)."""
        if self.store is not None:
            try:
                self.store.write(entry_name(record["bucket"], record["experiment"]), record)
            except LedgerUnavailable as e:
                log.warning("%s: the store ledger did not take the record (%s)", record["experiment"], e)

    def look(self, home, req, store_wait_s: float) -> tuple:
        """The claim path: (RUN, record) or (SETTLE | CANCEL | HOLD, record) for `req`; an
        interrupted run is counted here, once."""
        bucket, key = entry_of(req)
        record = self.read(bucket, key)
        verdict = decide(record, running_here=running_here(home, req), me=self.me, now=time.time(),
                         stale_s=self.stale_s, store_wait_s=store_wait_s,
                         finished_here=record is not None and finished_job_dir(home, req) is not None)
        if verdict == INTERRUPTED:
            return RUN, self.interrupted(record)
        return verdict, record

    # -- one job's records (job.py)

    def running(self, req, slot: str, attempt: int, before: Optional[dict], share: bool = True) -> dict:
        """Its run starts. `share=False` (a local queue's message: no other box can claim it): on
        this box only; the store learns of the run when it is final (`settled`)."""
        bucket, key = entry_of(req)
        ws = req.artifacts.get("workspace")
        now = time.time()
        return self.write({
            "experiment": key, "bucket": bucket, "state": RUNNING, "appliance": self.me,
            "host": os.uname().nodename, "slot": slot, "attempt": attempt, "started": now, "heartbeat": now,
            "owner": req.raw.get("experiment", {}).get("owner") if isinstance(req.raw.get("experiment"), dict) else None,
            "identity": ws.access_key if ws is not None else None,
            "interruptions": int((before or {}).get("interruptions") or 0)}, share=share)

    def heartbeat(self, record: dict) -> dict:
        """Still running; a cancel another box recorded in the store meanwhile is kept."""
        if self.store is not None and not record.get("cancel"):
            try:
                theirs = self.store.read(entry_name(record["bucket"], record["experiment"]))
                if theirs and theirs.get("cancel"):
                    record = {**record, "cancel": theirs["cancel"]}
            except LedgerUnavailable:
                pass
        return self.write({**record, "heartbeat": time.time()})

    def ended(self, record: dict, ended: dict, share: bool = True) -> dict:
        return self.write({**record, **ended, "state": ENDED_STATE, "heartbeat": time.time()}, share=share)

    def settled(self, record: dict, ended: dict, share: bool = True) -> dict:
        """Final (done or failed); `share=False`: the caller `share`s it with the store."""
        return self.write(self.final(record, ended), share=share)

    @staticmethod
    def final(record: dict, ended: dict) -> dict:
        """The final record (done or failed) of a run that ended as `ended`; not written yet."""
        return {**record, **ended, "state": DONE if ended.get("outcome") == "success" else FAILED,
                "updated": time.time()}

    def released(self, record: Optional[dict], why: str) -> Optional[dict]:
        if record is None or record.get("state") in FINAL:
            return record
        return self.write({**record, "state": RELEASED, "reason": why})

    def interrupted(self, record: dict) -> dict:
        """Count the run `record` tells of as interrupted, once (a claim that looks again
        finds it counted)."""
        if record.get("interrupted_run") == record.get("attempt"):
            return record
        n = int(record.get("interruptions") or 0) + 1
        log.warning("%s: its run (attempt %s on %s) was interrupted; interruption %d", record.get("experiment"),
                    record.get("attempt"), record.get("slot"), n)
        state = record.get("state") if record.get("state") == ENDED_STATE else RELEASED
        return self.write({**record, "state": state, "interruptions": n, "interrupted_run": record.get("attempt")})


def record_cancel(body: bytes, who: str, retry: Optional[RetryPolicy] = None, home=None) -> bool:
    """Record that the request `body` was cancelled before it ran: whichever box claims it next
    (a copy still on a shared broker) settles it unrun, acked. A request that ran, runs now or was
    cancelled already is left alone (False); so is one without a workspace bucket to key it by.
    `home`: the appliance's home (default: $APPLIANCE_HOME, else the default home); `retry` is
    accepted for callers of the older ledger and not needed (the store ledger retries itself)."""
    from appliance.paths import Home
    req = parse_request(body)
    bucket, key = entry_of(req)
    if not bucket:
        return False
    return cancel(home if home is not None else Home.at(None), bucket, key, who) is not None


def cancel(home, bucket: str, key: str, by: str, reason: str = "", config=None) -> Optional[dict]:
    """Record a cancel for (bucket, key) unless a run of it is recorded (running, ended, final)
    or a cancel is there already; the record written, else None."""
    ledger = Ledger.for_home(home, config)
    record = ledger.read(bucket, key)
    if record is not None and (record.get("cancel") or record.get("state") in (RUNNING, ENDED_STATE) + FINAL):
        return None
    record = record or {"experiment": key, "bucket": bucket, "state": "queued"}
    return ledger.write({**record, "cancel": {"by": by, "reason": reason, "at": time.time()}})


def cancel_reason(record: dict) -> str:
    c = record.get("cancel") or {}
    why = f": {c['reason']}" if c.get("reason") else ""
    return f"cancelled by {c.get('by') or '?'} before it ran{why}"


# ---------------------------------------------------------------- job folders on this box

ENDED = ".ended.json"  # JOB/.ended.json: the workload ended, how; written before any upload
REQUEST = ".request.json"  # JOB/.request.json: the message body, to finish the uploads later
LOCK = ".lock"  # held by the runner working on JOB


def job_folder(req) -> str:
    """The name of `req`'s job folder (in its slot's work folder): named by the same (bucket,
    key) as its ledger record, so two members' requests with one key never share a folder."""
    bucket, key = entry_of(req)
    return job_dir_name(f"{bucket}/{key}")


def finished_job_dir(home, req) -> Optional[Path]:
    """A job dir of `req` on this box (any slot) whose workload ended but whose uploads are not
    known to be done, and that no live runner holds; None if there is none."""
    for d in Path(home.work_dir).glob(f"*/{job_folder(req)}"):
        try:
            ended = json.loads((d / ENDED).read_text())
        except (OSError, ValueError):
            continue
        if ended.get("experiment") == req.key and _unlocked(d):
            return d
    return None


def running_here(home, req) -> bool:
    """A runner of this box holds `req`'s job folder now (its job runs or uploads)."""
    return any(not _unlocked(d) for d in Path(home.work_dir).glob(f"*/{job_folder(req)}")
               if (d / LOCK).exists())


def _unlocked(job_dir: Path) -> bool:
    try:
        with open(job_dir / LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def finish_uploads(job_dir: Path, retry: RetryPolicy, user: Optional[tuple], ledger: Optional[Ledger] = None) -> dict:
    """Upload every mutable artifact of a finished job dir, then record it done (the ledger, and
    the copy in the client's bucket) and remove the dir. Returns the ended record.
    StoreUnavailable leaves everything in place."""
    with open(job_dir / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ended = json.loads((job_dir / ENDED).read_text())
        req = parse_request((job_dir / REQUEST).read_bytes())
        Uploader(req.artifacts, job_dir, retry, user[0] if user else None).upload_changed()
        record = result_record(req.artifacts)
        if record is not None:
            transfer.write_record(record, {**ended, "state": "done"}, retry)
        if ledger is not None:
            bucket, key = entry_of(req)
            ledger.settled(ledger.read(bucket, key) or {"experiment": key, "bucket": bucket}, ended)
        shutil.rmtree(job_dir, ignore_errors=True)
    return ended


def resume_finished(root: Path, retry: RetryPolicy, user: Optional[tuple], stopping,
                    ledger: Optional[Ledger] = None) -> None:
    """Finish the uploads of jobs whose workload ended in `root` (one slot's work folder) but
    whose outputs did not all reach the store (runner killed while uploading, store down): the
    ledger then tells whoever claims the message next that it is done."""
    for d in sorted(root.iterdir()):
        if not (d / ENDED).is_file() or stopping():
            continue
        try:
            finish_uploads(d, retry, user, ledger)
        except StoreUnavailable as e:
            log.info("finished job %s: uploads wait for the store: %s", d.name, e)
        except Exception as e:  # noqa: BLE001 - one broken leftover must not stop the runner
            log.warning("finished job %s: cannot complete its uploads: %s", d.name, e)


def write_result(record_art, data: dict, retry: RetryPolicy, key: str) -> None:
    """Write the copy of the result record users read beside the outputs (in the client's
    bucket: never read back as truth). A failure is logged."""
    if record_art is not None:
        try:
            transfer.write_record(record_art, data, retry)
        except ArtifactError as e:
            log.warning("%s: result record: %s", key, e)
