"""One job's life: a claimed request from its fetch to its settled message.

One piece, about 460 lines, on purpose: the steps below share the job's state and run
in this order; what each step uses lives apart (launch, settle, ledger, execute, transfer).

    fetch artifacts (settled from the ledger if it ran before) -> Python environment ->
    run the workload (supervised: lifetime, drain, hang, GPU share) -> ledger: ended ->
    upload mutable artifacts -> ledger: done -> settle the message (ack / dead letter)

How each message is settled is told in runner.py; what makes a finished job never run again
is ledger.py's.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from appliance.files import write_atomic
from appliance import pyenv
from appliance.runner import classes, execute, gpu, launch, ledger
from appliance.runner.ledger import ENDED, LOCK, REQUEST
from appliance.runner.settle import SettleOnce, disk_full, put_back, release_or_quarantine
from appliance.runner.status import record_experiment
from appliance.studioml import transfer
from appliance.studioml.artifacts import OUTPUT_FILE, result_record
from appliance.studioml.transfer import ArtifactError, ArtifactTooBig, StoreUnavailable
from appliance.studioml.uploader import Uploader
from appliance.studioml.request import Request

log = logging.getLogger("appliance.runner")
DISK_RETRY_S = 2.0  # how often a finished job held for a full disk tries its record again


class Job:
    """One claimed request on its way through the runner (see module doc)."""

    def __init__(self, runner, src, msg, req: Request, job_dir: Path, resumed: bool = False):
        self.r, self.src, self.msg, self.req, self.dir = runner, src, msg, req, job_dir
        self.s = runner.settings
        self.status = runner.status
        self.settle_msg = SettleOnce(src, msg)
        self.output = job_dir / "output" / OUTPUT_FILE
        self.uploader = Uploader(req.artifacts, job_dir, self.s.retry,
                                 runner.user.uid if runner.user else None)
        self.record = result_record(req.artifacts)
        self.env: Optional[pyenv.PythonEnv] = None
        self.gpu: Optional[gpu.JobGpu] = None  # the job's GPU watch while it runs
        self.next_keepalive = time.time() + self.s.keepalive_s
        self.started = time.time()
        self.keep_dir = False  # the workload ended but its outputs are not all in the store
        self.workload_ended = False
        self.recorded = False  # record_experiment done  # run_workload returned: it killed what was left, renewed /dev/shm
        self.ledger = runner.ledger
        self.before = runner.ledger_seen.pop(req.key, None)  # its ledger record when claimed
        self.asked = runner.asked.pop(req.key, None)  # its store lookups, asked ahead (lookahead.py)
        self.entry: Optional[dict] = None  # its ledger record from now on (running, ended, ...)
        self.interruptions = int((self.before or {}).get("interruptions") or 0)
        # a shared queue's message: the store knows it runs and ended as soon as this box does (a
        # copy another box claims is held); a local one's only when it is final (no other box claims
        # it), and this box's running record is written once its workload started
        self.shared = bool(getattr(msg, "shared", False))
        self.lock = open(job_dir / LOCK, "a")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        if not resumed:
            self._make_dirs()

    def close(self) -> None:
        if not self.workload_ended:  # run_workload ends what the workload left; else it is done here
            execute.end_job(self.r.cgroup_slot, self.r.user_ids)  # its processes, its /dev/shm
        if self.env is not None:
            launch.keep_warm_venv(self)
        self.lock.close()

    def _make_dirs(self) -> None:
        """The job dir is the runner's (root, 0711); what the workload may write is its own."""
        out = self.output.parent
        out.mkdir(mode=0o700)
        for name in (".tmp", ".home"):
            self._own(self.dir / name, empty=True)

    def _own(self, path: Path, empty: bool = False) -> None:
        """`path` (made if missing, and everything in it) belongs to the workload's user, 0700.
        `empty`: a folder the job's new folder has not got yet, made here."""
        path.mkdir(mode=0o700, exist_ok=not empty)
        user = self.r.user
        if user is None:
            return
        if empty:
            os.chown(path, user.uid, user.gid, follow_symlinks=False)
            return
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, user.uid, user.gid, follow_symlinks=False)
        os.chmod(path, 0o700)

    # -- helpers

    def tick(self) -> None:
        now = time.time()
        if now >= self.next_keepalive:
            self.next_keepalive = now + self.s.keepalive_s
            try:
                self.src.keepalive(self.msg)
            except Exception as e:
                log.warning("keepalive %s: %s", self.req.key, e)
            if self.entry is not None:
                self.entry = self.ledger.heartbeat(self.entry)
        if self.r.stopping and self.status.data.get("state") != "draining":
            self.status.update(state="draining")

    def deadline(self) -> float:
        lifetime = self.req.lifetime_s or self.s.default_lifetime_s
        limits = [(self.req.time_added or self.started) + lifetime]
        if self.req.max_duration_s:
            limits.append(self.started + self.req.max_duration_s)
        return min(limits)

    def supervision(self, periodic_save: bool) -> execute.Supervision:
        return execute.Supervision(
            deadline=self.deadline(), stop_at=self.r.drain_deadline, tick=self.tick,
            save_every_s=self.req.save_every_s if periodic_save else None,
            save=self.save, tick_s=self.s.tick_s, term_grace_s=self.s.term_grace_s,
            hang_after_s=self.s.hang_after_s if periodic_save else 0.0,
            cancelled=lambda: self.r.jobs.cancel_requested(self.req.key))

    def note(self, text: str) -> None:
        """A line from the appliance in the experiment's output (a root-owned folder: no link
        the workload planted can redirect it)."""
        try:
            self.output.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(self.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "a") as f:
                f.write(f"appliance: {text}\n")
        except OSError as e:  # a full disk: the line is lost, the job is not
            log.warning("%s: %s (not written to its output: %s)", self.req.key, text, e)

    def save(self) -> None:
        """Periodic upload while the workload runs; a failure is logged and retried later."""
        try:
            if self.uploader.upload_changed():
                self.status.update(last_upload=self.uploader.last_upload)
        except ArtifactError as e:
            log.warning("periodic upload of %s: %s", self.req.key, e)

    def finish(self, outcome: str, exit_code, reason: str, gpu_use: Optional[dict] = None,
               cls: Optional[str] = None, report: Optional[dict] = None) -> None:
        cls = cls or classes.classify(outcome, exit_code, reason)
        if not self.recorded:  # it ended before its workload started
            self.record_experiment()
        # at once (the steps before it were lazy): each job's result shows, even in a burst
        self.status.job_finished(outcome, exit_code, reason, gpu=gpu_use, cls=cls, report=report)
        self.r.jobs.finished(self.req.key, outcome, cls, exit_code, reason, report)
        log.info("%s: %s [%s] %s", self.req.key, outcome, cls, reason)

    # -- the steps

    def run(self) -> None:
        req, msg = self.req, self.msg
        # a job that starts at once writes its status once, when its workload started
        self.status.job_started(req.key, msg.queue, msg.source, enqueued=req.time_added, owner_uid=msg.owner_uid,
                                lazy=True)
        log.info("running %s from %s/%s (attempt %s)", req.key, msg.source, msg.queue,
                 getattr(msg, "attempt", 1))
        if self.shared:  # the store knows it runs before anything else happens
            self.entry = self.ledger.running(req, self.r.slot, getattr(msg, "attempt", 1), self.before)

        if not self.fetch():
            return
        self.status.update(state="preparing", output=str(self.output), lazy=True)
        if self.output.exists() and self.output.stat().st_size:
            self.note(f"running again on slot {self.r.slot} (an earlier attempt was cut short)")
        result = launch.prepare_env(self)
        if result is None:
            busy = self.r.gpu_busy()
            if busy:  # it came while we fetched: not started, not counted
                self.give_back(busy)
                return
            result = self.execute()
        self.settle(result)

    def fetch(self) -> bool:
        self.uploader.mark_current()  # nothing yet: a failure uploads only the output
        order = sorted(self.req.artifacts.values(), key=lambda a: a.name != "workspace")
        mutable = [a for a in order if a.mutable]
        limit = left = launch.unpack_limit(self)
        try:
            known = self.asked.listed() if self.asked else \
                transfer.listed(mutable + ([self.record] if self.record else []), self.s.retry)
            for art in order:
                self.tick()
                if self.r.stopping:
                    return self.give_back("runner stopping before the job started")
                if art.mutable and known.get(art.name) is False:  # not in the store: an empty folder
                    if art.name != "output":  # (made with the job's folder)
                        self._own(self.dir / art.name, empty=True)
                    continue
                got = transfer.fetch(art, self.dir / art.name, None if art.mutable else self.r.cache,
                                     self.s.retry, left, exists=known.get(art.name) if art.mutable else None,
                                     known_as=self.asked.cache_key(art.name) if self.asked else None,
                                     downloading=self.status.flush)
                left -= got or 0
                if art.name != "output":
                    self._own(self.dir / art.name)
            if self.before is None and self.record is not None and known.get(self.record.name):
                log.warning("%s: ignoring the result record in the client's bucket (%s): the appliance's "
                            "ledger has no run of this request", self.req.key, self.record.key)
        except StoreUnavailable as e:
            endpoint = next(iter(self.req.artifacts.values())).endpoint_url
            self.r.store_health.down(endpoint)
            if self.r.store_health.own(endpoint):  # the box's store is down: not the request's fault
                return self.give_back(f"store unavailable: {e}")
            return self.unreachable(f"store unavailable: {e}")
        except Exception as e:  # AccessDenied, ArtifactMissing, UnsafeArchive, bad tar, bad name
            reason = str(e) if isinstance(e, ArtifactError) else \
                f"fetching artifacts: {type(e).__name__}: {e}"
            if isinstance(e, ArtifactTooBig):
                reason += (f" (the job's artifacts may unpack to {limit} bytes in all: the request's hdd, "
                           "runner.max_unpack and the slot's share of the disk, whichever is least)")
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise  # the disk's fault, not the request's: released and counted by process()
            self.note(reason)
            self.upload_quietly()
            self.entry = self.ledger.released(self.entry, reason)  # not run: a fixed request may run
            self.settle_msg("dead_letter", f"{reason} [class: {classes.classify('failed', None, reason)}]")
            self.finish("failed", None, reason)
            return False
        self.r.store_health.up(next(iter(self.req.artifacts.values())).endpoint_url)
        self.uploader.mark_current()  # what is on disk now is what the store has
        return True

    def unreachable(self, reason: str) -> bool:
        """A store the request names (not this box's own) did not answer: a counted attempt, so
        a request naming an endpoint nobody can reach is dead-lettered within runner.max_attempts."""
        self.entry = self.ledger.released(self.entry, reason)
        if getattr(self.msg, "attempt", 1) - self.interruptions >= self.s.max_attempts:
            why = f"{reason} (tried {self.s.max_attempts} times) [class: {classes.classify('failed', None, reason)}]"
            log.warning("dead-lettering %s: %s", self.req.key, why)
            self.settle_msg("dead_letter", why)
            self.finish("failed", None, reason)
        else:
            log.warning("releasing %s (a counted attempt): %s", self.req.key, reason)
            self.settle_msg("release")
            self.finish("released", None, reason)
        return False

    def give_back(self, reason: str) -> bool:
        """Put the message back before its workload started (not counted as a try)."""
        log.warning("releasing %s: %s", self.req.key, reason)
        self.entry = self.ledger.released(self.entry, reason)
        self.settle_msg.done = True
        put_back(self.src, self.msg)
        self.finish("released", None, reason)
        return False

    def execute(self) -> execute.Result:
        def started(proc):  # what nobody needs before the workload runs is told now
            self.status.update(state="draining" if self.r.stopping else "running", lazy=True,
                               workload={"pid": proc.pid, "start_ticks": execute.process_start_ticks(proc.pid)})
            if self.entry is None:  # a local queue's message: its running record (this box's alone)
                self.entry = self.ledger.running(self.req, self.r.slot, getattr(self.msg, "attempt", 1),
                                                 self.before, share=False)
            self.record_experiment()

        sv = self.supervision(True)
        if self.r.gpus.active:
            self.gpu = gpu.JobGpu(self.r.gpus, self.s.gpu_watch_s)
            sv.check = lambda: launch.gpu_check(self)
        argv, env = launch.argv(self), launch.workload_env(self)
        launch.warm_next(self, env)
        result = execute.run_workload(
            argv, self.dir / "workspace", env, self.output,
            sv, slot=self.r.cgroup_slot, on_start=started,
            container_slot=self.r.container_slot, launcher=self.r.launcher, user=self.r.user_ids,
            on_end=lambda: launch.gpu_end(self), ram_bytes=self.req.resources.ram_bytes)
        self.workload_ended = result.usage is not None  # it ran, and run_workload cleaned up after it
        return result

    def record_experiment(self) -> None:
        """Where `appliance logs` and `results` find this experiment's output (status.py)."""
        req, msg = self.req, self.msg
        self.recorded = True
        record_experiment(self.r.home, req.key, {
            "experiment": req.key, "slot": self.r.slot, "queue": msg.queue, "owner_uid": msg.owner_uid,
            "claimed": self.started, "output": str(self.output),
            "artifacts": {n: {"endpoint_url": a.endpoint_url, "bucket": a.bucket, "key": a.key,
                              "mutable": a.mutable} for n, a in req.artifacts.items()}})

    def upload_quietly(self) -> None:
        try:
            self.uploader.upload_changed()
        except ArtifactError as e:
            log.warning("uploading %s: %s", self.req.key, e)

    def failed_inside(self, error: BaseException) -> None:
        """process() caught an exception of the runner's own: settle the message (once)."""
        if self.keep_dir or self.settle_msg.done:
            return
        self.settle_msg.done = True
        self.entry = self.ledger.released(self.entry, f"runner error: {type(error).__name__}: {error}")
        release_or_quarantine(self.src, self.msg, error, self.s.max_attempts + self.interruptions)
        what = "the disk is full" if isinstance(error, OSError) and error.errno == errno.ENOSPC \
            else f"runner error: {type(error).__name__}: {error}"
        self.status.job_finished("released", None, what)
        self.r.jobs.given_back(self.req.key, what)

    def settle(self, result: execute.Result) -> None:
        self.status.update(workload=None, lazy=True)
        if result.outcome == execute.INTERRUPTED:  # drained: never ended, runs again, not counted
            self.status.update(state="uploading")
            self.upload_quietly()
            self.entry = self.ledger.released(self.entry, result.reason)
            self.settle_msg.done = True
            put_back(self.src, self.msg)
            self.finish(result.outcome, result.exit_code, result.reason)
            return
        if result.outcome == execute.FAILED and disk_full(self.dir):
            # the workload most likely failed for want of disk: the box's fault, not the user's
            self.status.update(state="uploading")
            self.upload_quietly()
            self.failed_inside(OSError(errno.ENOSPC, f"no space left while it ran ({result.reason})"))
            return
        cls = classes.classify(result.outcome, result.exit_code, f"{result.reason}\n{result.detail}")
        if classes.retried(cls) and self.retry_later(result, cls):
            return
        ended = {"state": "ended", "outcome": result.outcome, "class": cls, "exit_code": result.exit_code,
                 "reason": result.reason, "finished": time.time(), "slot": self.r.slot,
                 "host": os.uname().nodename, "experiment": self.req.key}
        if self.gpu is not None:
            ended["gpu"] = self.gpu.summary()  # peak GPU memory, mean utilisation
        ended["report"] = launch.report(self, result)
        self.note(f"{result.outcome}: {classes.report_line(ended['report'])}")
        self.hold_for_space(lambda: self._record_end(ended), "to record that it ended")  # never runs again
        self.status.update(state="uploading", lazy=True)  # "uploading": ended, and never runs again
        self.keep_dir = True
        self.entry = self.ledger.ended(self.entry or self.ledger_entry(), ended,  # the users' copy: once done
                                       share=self.shared)
        self.complete(ended)

    def _record_end(self, ended: dict) -> None:
        """JOB/.ended.json, and the request beside it that finishing its uploads later reads."""
        fd = os.open(self.dir / REQUEST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.msg.body)
        write_atomic(self.dir / ENDED, json.dumps(ended), mode=0o600, durable=True)  # syncs the folder too

    def hold_for_space(self, write, what: str) -> None:
        """Do `write` (a durable record of the finished job) once the disk takes it: while it is
        full, hold the job and its message (kept alive, never released: released, it would run
        again in full) and say why in the status. A runner told to stop meanwhile gives up: the
        error goes to process(), which settles the message."""
        since = time.time()
        while True:
            try:
                write()
                if self.status.data.get("held"):
                    self.status.update(held=None)
                    log.info("%s: the disk took its record after %.0fs", self.req.key, time.time() - since)
                return
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT) or self.r.stopping:
                    raise
                if not self.status.data.get("held"):
                    log.warning("%s: finished, but the disk is full: holding it until space returns %s (%s)",
                                self.req.key, what, e)
                self.status.update(held=f"finished; disk full: holding it until space returns {what} "
                                        f"(free space on {self.dir.parent}) since {time.strftime('%H:%M:%S')}")
                end = time.time() + DISK_RETRY_S
                while time.time() < end and not self.r.stopping:
                    self.tick()
                    time.sleep(min(0.5, self.s.tick_s))

    def retry_later(self, result: execute.Result, cls: str) -> bool:
        """An infrastructure failure with retries left: hold the message for a backoff, then
        release it counted, so the next claim (any slot, any appliance) is attempt + 1. The
        attempt count the message carries is the retry count (retry n = attempt n + 1): one
        counter for both limits, so a job runs at most 1 + min(runner.retries,
        runner.max_attempts - 1) times. False when no retry is left (then it is dead-lettered)."""
        done = getattr(self.msg, "attempt", 1) - 1 - self.interruptions  # retries behind it
        if done >= self.s.retries or done + 1 >= self.s.max_attempts:
            return False
        self.note(f"{result.outcome} ({cls}): {result.reason}; running it again "
                  f"(retry {done + 1} of {self.s.retries})")
        self.status.update(state="uploading")
        self.upload_quietly()
        wait = min(self.s.retry_backoff_s * (2 ** done), self.s.retry_backoff_max_s)
        end = time.time() + wait
        while time.time() < end and not self.r.stopping:
            self.tick()
            time.sleep(min(1.0, self.s.tick_s, max(0.0, end - time.time())))
        self.entry = self.ledger.released(self.entry, f"retry: {result.reason}")
        self.settle_msg.done = True
        self.src.release(self.msg)
        self.status.job_finished(result.outcome, result.exit_code, result.reason,
                                 cls=cls, retry=done + 1)
        self.r.jobs.given_back(self.req.key, f"{result.reason}; retry {done + 1}")
        log.warning("%s: %s [%s] %s: retry %d of %d", self.req.key, result.outcome, cls, result.reason,
                    done + 1, self.s.retries)
        return True

    def _write_record(self, data: dict) -> None:
        ledger.write_result(self.record, data, self.s.retry, self.req.key)  # the users' copy

    def ledger_entry(self) -> dict:
        bucket, key = ledger.entry_of(self.req)
        return self.ledger.read(bucket, key) or {"experiment": key, "bucket": bucket, "appliance": self.ledger.me}

    def complete(self, ended: dict) -> None:
        """The workload ended as `ended` says: upload its outputs, record that in the store, and
        settle the message as the workload ended (never run again)."""
        if not self.upload_until_done():
            return
        if self.workload_ended and not self.r.stopping:
            # the next job's interpreter starts up while this one's records are written (a burst
            # of short jobs: started at the next claim, it was still starting when that job came;
            # started before the upload, it held the output back by ~10 ms on a 2-core box)
            self.r.launcher.warm(*self.r.warm_with)
        # its final record on this box (durable), in the store and the users' copy, all at once: a
        # kill between them leaves the ended one here (.ended.json: finished, never run again) or a
        # final one somewhere, and a claim goes by the newer of this box's and the store's
        final = self.ledger.final(self.entry or self.ledger_entry(), ended)
        *_, self.entry = self.r.lookahead.together(
            lambda: self.ledger.share(final), lambda: self._write_record({**ended, "state": "done"}),
            here=lambda: self.ledger.write(final, share=False))
        self.keep_dir = False
        self.status.update(last_upload=self.uploader.last_upload, lazy=True)
        outcome, reason = ended.get("outcome", execute.FAILED), ended.get("reason", "")
        cls = ended.get("class") or classes.classify(outcome, ended.get("exit_code"), reason)
        if outcome in (execute.SUCCESS, execute.CANCELLED):  # done, or stopped as its owner asked
            self.settle_msg("ack")
        else:
            self.settle_msg("dead_letter", f"{outcome}: {reason} [class: {cls}]")
        self.finish(outcome, ended.get("exit_code"), reason, ended.get("gpu"), cls=cls,
                    report=ended.get("report"))

    def upload_until_done(self) -> bool:
        """Upload the finished job's outputs, holding its message while the store is down (up
        to runner.store_wait). False if the message was settled otherwise: released with the
        outputs kept here (resume_finished uploads them later), or dead-lettered."""
        delay = self.s.store_backoff_s
        give_up = time.time() + self.s.store_wait_s
        while True:
            try:
                self.uploader.upload_changed()
                return True
            except StoreUnavailable as e:
                if self.r.stopping or time.time() >= give_up:
                    self.settle_msg.done = True
                    put_back(self.src, self.msg)
                    self.finish("released", None, f"finished, but the store did not take its outputs ({e}); "
                                                  f"they are kept on this box and uploaded when it answers")
                    return False
                log.warning("%s: finished; uploads wait for the store: %s", self.req.key, e)
                end = time.time() + delay
                while time.time() < end and not self.r.stopping:
                    self.tick()
                    time.sleep(min(1.0, self.s.tick_s))
                delay = min(delay * 2, self.s.store_backoff_max_s)
            except ArtifactError as e:  # refused credentials, bad bucket: retrying cannot help
                self.keep_dir = False
                self.entry = self.ledger.settled(self.entry or self.ledger_entry(),
                                                 {"outcome": "failed", "reason": f"uploading failed: {e}"})
                self.settle_msg("dead_letter", f"finished, but uploading failed: {e} "
                                               f"[class: {classes.classify('failed', None, str(e))}]")
                self.finish("failed", None, f"uploading failed: {e}")
                return False

    def resume(self) -> None:
        """This request's workload already ended on this box: upload what is left, then settle."""
        ended = json.loads((self.dir / ENDED).read_text())
        log.info("%s: its workload ended before (%s); finishing the uploads, not running it again",
                 self.req.key, ended.get("outcome"))
        self.status.job_started(self.req.key, self.msg.queue, self.msg.source, owner_uid=self.msg.owner_uid)
        self.keep_dir = True
        self.complete(ended)
