"""The runner: one loop per slot, from queue message to uploaded results.

This module is the claim loop, some 45 lines over 400: the loop's state (sources, cursor, ledger,
launcher, lookahead) is one object. What a slot may run is triage.py, one job's life job.py, the
exactly-once ledger ledger.py, store health store_health.py, shared-queue refusals refusing.py.

    claim (round-robin over sources and queues) -> parse -> ledger: ran? runs now? -> fits this
    slot? -> fetch artifacts -> Python environment -> run the workload -> upload -> settle

How each message is settled:
- ack: the workload succeeded and its results are in the store (now, or by the ledger before).
- give back uncounted: another slot can run it but this one cannot; its job runs now (on this
  box or another: the ledger), until that run settles; its store did not answer (this runner
  then pauses that store, with backoff); the runner was stopped (drain) before the job finished.
- release counted: a store the request names did not answer; the box's own failure (retries).
- refuse (on a queue other appliances share: RabbitMQ, SQS): no slot of this appliance could
  ever run it. Back to the queue for the others, uncounted, with this appliance added to its
  refusal record; this runner leaves it alone for a while, and a queue holding nothing else is
  not claimed from until a message arrives or a wait ends (refusing.py, queues/refusals.py).
- dead_letter with the reason and its [class: ...]: malformed (BadRequest), no slot could ever
  run it (shared queues: once the fleet refused it), expired before it started, cancelled,
  credentials refused / workspace missing, past runner.max_attempts or max_interruptions, or
  the job failed for good. Its `output` is uploaded first, so the user sees why.

SIGTERM/SIGINT: drain. Idle: exit at once (the signal ends the idle wait: wakeup.py). Busy: the
job may finish within `drain_timeout_s`; after that it gets SIGTERM (to checkpoint), SIGKILL
after `term_grace_s`, its artifacts are uploaded and its message released, and the runner exits
0. supervisord's `stopwaitsecs` must therefore exceed drain_timeout_s + term_grace_s + an upload.

A runner killed with SIGKILL takes its workload with it (PDEATHSIG); the queue source gives
the orphaned claim back (`recover_orphans`) and the job runs again from its last upload (an
interruption in the ledger, not one of the job's attempts).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

from appliance import events
from appliance import pyenv
from appliance.jobs import record as jobs_record
from appliance.jobs.record import RunnerRecord
from appliance.runner import classes, execute, gpu, ledger
from appliance.runner.cache import ArtifactCache
from appliance.runner.counters import SlotCounters
from appliance.runner.job import Job
from appliance.runner.lookahead import Lookahead
from appliance.runner.ledger import ENDED, Ledger, finished_job_dir
from appliance.runner.refusing import FleetRefusals
from appliance.runner.settings import RunnerSettings  # noqa: F401  (with Runner: what callers make)
from appliance.runner.settle import put_back, release_or_quarantine, settle_broken
from appliance.runner.status import StatusFile
from appliance.runner.store_health import StoreHealth
from appliance.runner.wakeup import SignalWake
from appliance.runner.triage import ELSEWHERE, LATER, RUN, expired, fit, slot_shapes, this_slot
from appliance.slot import users
from appliance.studioml import transfer
from appliance.studioml.keys import safe_name
from appliance.studioml.request import BadRequest, Request, parse_request

log = logging.getLogger("appliance.runner")


def _holders(held: dict):
    return [p["pid"] for p in held["processes"]] or held["reason"]


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim): what the last jobs
    allocated and freed stays in the runner's RSS otherwise (~1 MB measured after a burst)."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # a libc without it (musl): nothing to give back
        pass


class Runner:
    def __init__(self, home, slot: str, sources: list, settings: RunnerSettings | None = None,
                 environ=None):
        self.home = home
        self.slot = slot
        self.sources = list(sources)
        self.settings = settings or RunnerSettings()
        self.environ = dict(os.environ if environ is None else environ)
        # in a slot (the exec wrapper set APPLIANCE_SLOT), workloads join its job cgroup;
        # none with the docker backend (the container is the slot) or outside a slot
        self.cgroup_slot = execute.job_cgroup(self.environ.get("APPLIANCE_SLOT"))
        # in a slot's container, that container's own cgroup counts the OOM kills
        self.container_slot = (self.environ.get("APPLIANCE_SLOT") if not self.cgroup_slot
                               and execute.in_container() else None)
        # who workloads run as: an unprivileged account of this slot, never the runner's root
        self.user = self._workload_user()
        # the next workload's process, started while idle (saves a fork when a job comes)
        self.launcher = execute.Launcher(self.cgroup_slot)
        self.warm_with: tuple = ()  # (python, env, user) the next launcher warms up as (the last job's)
        self.warm_venv = None  # that job's venv, held so the cache does not evict it under the interpreter
        self.status = StatusFile(home, slot)
        self.cache = ArtifactCache(home.artifact_cache, self.settings.artifact_cache_bytes)
        self.venvs = pyenv.VenvCache(home.venv_cache, max_bytes=self.settings.venv_cache_bytes,
                                     max_count=self.settings.venv_cache_max,
                                     build_env=execute.base_env(self.environ),
                                     uv_cache=pyenv.UvCache(home.uv_cache, self.settings.env_cache_bytes)
                                     if self.settings.installer == "uv" else None)
        self.status.counters = SlotCounters(home, slot, artifact_cache=self.cache, env_cache=self.venvs,
                                            store_errors=transfer.STORE_ERRORS)
        self.stop_requested_at: Optional[float] = None
        self.wake: Optional[SignalWake] = None  # readable once a signal came (install_signals)
        self.cursor = 0
        self.heap_untrimmed = False  # jobs ran since the runner last gave free memory back
        self.store_health = StoreHealth(self.settings.store_backoff_s, self.settings.store_backoff_max_s,
                                        own=self.settings.own_store)
        self.held_back = False  # the last pass put back messages this slot cannot run now
        self.next_resume = 0.0
        # NVML for this slot's GPUs, opened once (no GPUs: nothing is asked)
        own = self.user if self.user and self.user.name == users.account_name(slot) else None
        self.gpus = gpu.slot_gpus(self.environ, self.cgroup_slot, own.uid if own else None,
                                  self.settings.gpu_share, in_container=bool(self.container_slot))
        self.gpu_held: Optional[dict] = None
        self.fleet = FleetRefusals(home, slot, self.settings)  # shared queues: what this slot refused
        self.ledger = Ledger.for_home(home, me=self.fleet.appliance_id,
                                      stale_s=max(3 * self.settings.keepalive_s, 30.0))
        self.ledger_seen: dict[str, Optional[dict]] = {}  # experiment -> its ledger record when claimed
        self.lookahead = Lookahead()  # a job's HEAD and LIST, asked while it is got ready
        self.asked: dict = {}  # experiment -> what the lookahead asked for it
        self.held_logged: dict[str, float] = {}  # experiment -> when its hold was last logged
        self.sources = events.announce_settlements(self)  # finished, failed, dead-lettered: events
        self.jobs = RunnerRecord(home, slot)  # the job table: each state change, held and cancelled jobs

    def _workload_user(self):
        if os.geteuid() != 0:
            return None  # cannot switch users: workloads run as the runner (dev, tests as a user)
        return users.workload_user(self.environ.get("APPLIANCE_WORKLOAD_USER", self.settings.workload_user),
                                   self.slot)

    @property
    def user_ids(self) -> Optional[tuple]:
        return (self.user.uid, self.user.gid) if self.user else None

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self, *_args) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = time.time()

    @property
    def stopping(self) -> bool:
        return self.stop_requested_at is not None

    def drain_deadline(self) -> Optional[float]:
        if self.stop_requested_at is None:
            return None
        return self.stop_requested_at + self.settings.drain_timeout_s

    def install_signals(self) -> None:
        self.wake = SignalWake()  # an idle runner stops at once, however long it sleeps
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run_forever(self, exit_when_idle: bool = False) -> int:
        prev = self.status.previous or {}
        if execute.kill_leftover(prev.get("workload")):
            log.warning("killed the workload a previous runner of slot %s left behind", self.slot)
        execute.kill_job_leftovers(self.cgroup_slot)
        self.resume_finished()  # before orphans come back: their result is in the store first
        for src in self.sources:
            recover = getattr(src, "recover_orphans", None)
            if recover:
                recover()
        self.status.update(state="idle", pid=os.getpid(), gpu_note=self.gpus.problem or None, gpu_held=None)
        if self.gpus.blocked:
            log.error("slot %s runs no job: %s", self.slot, self.gpus.blocked)
        elif self.gpus.problem:
            log.warning("slot %s: %s", self.slot, self.gpus.problem)
        try:
            while not self.stopping:
                if self.run_once():
                    continue
                if time.time() >= self.next_resume:
                    self.resume_finished()
                if exit_when_idle and not self.held_back:
                    break
                self._idle(self.settings.idle_wait_s if not self.held_back
                           else min(2.0, self.settings.idle_wait_s))
        finally:
            self.launcher.close()
            self.lookahead.close()
            if self.warm_venv is not None:
                self.warm_venv.release()
            self.gpus.close()
            self.jobs.close()
            for src in self.sources:
                try:
                    src.close()
                except Exception:
                    log.exception("closing queue source %s", getattr(src, "name", src))
            self.status.update(state="stopped")
        return 0

    def _idle(self, seconds: float) -> None:
        """Wait for work: a message, a change of the sources, or a signal ends the wait at once
        (without install_signals, it waits in steps of a second so a stop is seen)."""
        self.launcher.warm(*self.warm_with)
        self.status.flush()  # the last job's end, before the runner rests
        if self.heap_untrimmed:
            self.heap_untrimmed = False
            trim_heap()
        end = time.monotonic() + max(0.0, seconds)
        waiter = next((s for s in self.sources if hasattr(s, "wait")), None)
        while not self.stopping:
            left = end - time.monotonic()
            if left <= 0:
                return
            step = left if self.wake else min(1.0, left)
            if waiter is not None and not self.held_back:
                if waiter.wait(step, wake_fd=self.wake.fd if self.wake else None):
                    break
            elif self.wake:
                if self.wake.sleep(step):
                    break
            else:
                time.sleep(step)
        if self.wake and not self.stopping:
            self.wake.clear()  # a signal that does not stop the runner: its byte must not wake it again

    # ------------------------------------------------------------------ claiming

    def _pairs(self) -> list:
        pairs = []
        for src in self.sources:
            try:
                for q in src.queues():
                    pairs.append((src, q))
            except Exception as e:
                log.warning("queue source %s: %s", getattr(src, "name", src), e)
        return pairs

    def run_once(self) -> bool:
        """Claim and run at most one message; False if there was nothing to run."""
        self.launcher.warm(*self.warm_with)  # gets ready while we claim and fetch (no-op if it is waiting)
        found = self.next_message()
        if found is None:
            return False
        src, msg, req = found
        self.process(src, msg, req)
        self.heap_untrimmed = True
        return True

    def gpu_busy(self) -> Optional[str]:
        """Why this slot's GPUs cannot take a job now (a foreign process on them, MPS missing),
        kept in `status` as gpu_held; None when they can."""
        held = gpu.hold_of(self.gpus, self.slot)
        before = self.gpu_held
        if held != (before and {k: before[k] for k in ("reason", "processes")}):
            if held:
                held["since"] = (before or {}).get("since") or time.time()
                if not before or _holders(before) != _holders(held):  # not at every change of its memory
                    log.warning("slot %s holds its jobs back: %s", self.slot, held["reason"])
            else:
                log.info("slot %s: its GPUs are free again", self.slot)
            self.gpu_held = held
            self.status.update(gpu_held=held)
        return held["reason"] if held else None

    def next_message(self):
        """Round-robin: start at the queue after the one we last ran from."""
        self.held_back = False
        self.fleet.keep_current()
        if self.gpu_busy():  # claim nothing: the messages stay in their queues, untouched
            self.held_back = True
            return None
        pairs = self._pairs()
        for i in range(len(pairs)):
            idx = (self.cursor + i) % len(pairs)
            src, queue = pairs[idx]
            if self.fleet.is_quiet(src, queue):
                continue
            held, waiting, found = [], [], False
            try:
                for _ in range(32):  # look past messages only other slots can run
                    try:
                        prefer = self.jobs.fair_first(queue.rsplit("/", 1)[-1]) if "local" in queue else ()
                        msg = src.claim(queue, prefer=prefer) if prefer else src.claim(queue)
                    except Exception as e:
                        log.warning("claim from %s/%s: %s", src.name, queue, e)
                        break
                    if msg is None:
                        break
                    try:
                        verdict = self.triage(src, msg)
                    except Exception as e:  # whatever it is, this message caused it: settle it
                        log.exception("triage of %s/%s", msg.queue, msg.message_id)
                        verdict = settle_broken(src, msg, f"{type(e).__name__}: {e}")
                    if isinstance(verdict, Request):
                        verdict = self.jobs_verdict(src, msg, verdict)
                    if isinstance(verdict, Request):
                        self.cursor = idx + 1
                        found = True
                        return src, msg, verdict
                    if verdict == "held":
                        held.append(msg)
                    elif verdict in ("waiting", "refused"):
                        waiting.append((msg, verdict))
            finally:
                for m in held:
                    put_back(src, m)
                for m, verdict in waiting:
                    self.fleet.give_back(src, m, verdict)
                if held:
                    self.held_back = True
                elif waiting and not found:
                    self.fleet.go_quiet(src, queue, [m for m, _ in waiting])
        return None

    def jobs_verdict(self, src, msg, req: Request):
        """What the job table says of a request triage would run: `req` to run it, "held" (held,
        or its array at its %N bound), "settled" (cancelled while it waited: settled unrun)."""
        said = self.jobs.claim(msg, req.key)
        if said == jobs_record.HOLD:
            return "held"
        if said == jobs_record.CANCEL:
            log.info("%s was cancelled before it started: settled unrun", req.key)
            src.ack(msg)
            return "settled"
        if said == jobs_record.DUPLICATE:
            src.dead_letter(msg, f"experiment key {req.key} is already another job's on this appliance; "
                                 f"submit it with a new key [class: {classes.USER}]")
            return "settled"
        return req

    def table_ended(self, msg, key: str, outcome: str, cls, exit_code, reason: str) -> None:
        """The ledger settled `key` unrun: the job table records how (a row first, if none)."""
        if not self.jobs.is_finished(key):
            self.jobs.claim(msg, key)
            self.jobs.ended(key, outcome, cls, exit_code, reason)

    def triage(self, src, msg):
        """A Request to run now, "held" (give back: not here or not now), "waiting"/"refused"
        (a shared queue's message no slot here can run), or "settled"."""
        if getattr(msg, "shared", False) and self.fleet.waiting(msg, time.time()):
            return "waiting"  # refused here a moment ago: give it back untouched
        try:
            req = parse_request(msg.body)
        except BadRequest as e:
            log.warning("dead-lettering %s/%s: bad request: %s", msg.queue, msg.message_id, e)
            src.dead_letter(msg, f"bad request: {e} [class: {classes.USER}]")
            return "settled"
        endpoints = [a.endpoint_url for a in req.artifacts.values()]
        placed = self._placement(req)
        # one that will run here unless the ledger settles it: its store lookups go out now, beside the
        # ledger's own request (every check below still decides, in the same order)
        runs_here = placed[0] == RUN and not expired(req, self.settings.default_lifetime_s, time.time()) \
            and not self.store_health.paused(endpoints, time.time())
        early = self._ask(req) if runs_here else None
        verdict, record = self.ledger.look(self.home, req, self.settings.store_wait_s)
        if verdict != ledger.RUN:
            return ledger.settle_from(verdict, record, src, msg, req.key, self.status, self.held_logged,
                                      ended=lambda *how: self.table_ended(msg, req.key, *how))
        too_often = ledger.over_limits(getattr(msg, "attempt", 1), record, self.settings.max_attempts,
                                       self.settings.max_interruptions)
        if too_often:
            log.warning("quarantining %s/%s: %s", msg.queue, msg.message_id, too_often)
            src.dead_letter(msg, too_often)
            return "settled"
        too_late = expired(req, self.settings.default_lifetime_s, time.time())
        if too_late:
            src.dead_letter(msg, f"{too_late} [class: {classes.TIMEOUT}]")
            return "settled"
        if self.store_health.paused(endpoints, time.time()):
            return "held"  # its store did not answer a moment ago: other queues first
        verdict, here = placed
        if verdict == RUN:
            self.ledger_seen = {req.key: record}
            self.asked = {req.key: early or self._ask(req)}
            return req
        if verdict in (LATER, ELSEWHERE):
            return "held"  # not now (the disk may free up), or another slot can
        if getattr(msg, "shared", False):
            return self.fleet.refuse(src, msg, req, here)
        src.dead_letter(msg, f"no slot of this appliance can run it: {here} [class: {classes.USER}]")
        log.warning("dead-lettering %s: no slot can run it: %s", req.key, here)
        return "settled"

    def _placement(self, req) -> tuple:
        """(verdict, why) of triage.fit for `req` on this slot now."""
        disk = shutil.disk_usage(self._work_root())
        me = this_slot(self.home, self.slot, self.environ)
        others = [s for s in slot_shapes(self.home) if s.name != self.slot]
        return fit(req, me, others, disk.total, disk.free)

    def _ask(self, req):
        """Its fetch's store lookups, asked in the background (lookahead.py)."""
        return self.lookahead.ask(req, self.settings.retry, cached=self.cache is not None)

    # ------------------------------------------------------------------ one job

    def _work_root(self) -> Path:
        root = Path(self.home.work_dir) / safe_name(self.slot)
        if not root.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            os.chmod(root.parent, 0o711)  # workloads pass through to their own job only
            os.chmod(root, 0o711)
        return root

    def process(self, src, msg, req: Request) -> None:
        root = self._work_root()
        for old in root.iterdir():  # what a killed predecessor left (finished jobs excepted)
            if old.is_dir() and not old.is_symlink() and (old / ENDED).exists():
                continue
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
        job_dir = root / ledger.job_folder(req)
        finished = finished_job_dir(self.home, req)
        job = None
        try:
            if finished is not None:  # the workload ended here before: finish its uploads
                job = Job(self, src, msg, req, finished, resumed=True)
                job.resume()
            else:
                shutil.rmtree(job_dir, ignore_errors=True)
                job_dir.mkdir(mode=0o711)
                job = Job(self, src, msg, req, job_dir)
                job.run()
        except Exception as e:  # a bug, a full disk, a hostile corner: settle it, never die of it
            log.exception("%s: the runner failed on this request", req.key)
            if job is not None:
                job.failed_inside(e)
            else:
                release_or_quarantine(src, msg, e, self.settings.max_attempts)
                self.status.job_finished("released", None, f"runner error: {type(e).__name__}: {e}")
                self.jobs.given_back(req.key, f"runner error: {type(e).__name__}: {e}")
        finally:
            if job is not None:
                job.close()
                if not job.keep_dir:
                    shutil.rmtree(job.dir, ignore_errors=True)

    def resume_finished(self) -> None:
        """Finish the uploads of jobs whose workload ended on this slot but whose outputs did
        not all reach the store (runner killed while uploading, store down): the result record
        then tells whoever claims the message next that it is done."""
        self.next_resume = time.time() + self.settings.resume_every_s
        ledger.resume_finished(self._work_root(), self.settings.retry, self.user_ids, lambda: self.stopping,
                               self.ledger)
