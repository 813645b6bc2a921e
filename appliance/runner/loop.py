"""The runner: one single-threaded loop per slot, from queue message to uploaded results.

    claim (round-robin over sources and queues) -> parse -> fits this slot? -> fetch artifacts
    -> Python environment -> run the workload -> upload mutable artifacts -> settle message

How each message is settled:
- ack: the workload succeeded and its results are in the store.
- release (back to the queue, runs again): another slot can run it but this one cannot; the
  store did not answer (after retries; this runner then pauses claiming, with backoff); the
  runner was stopped (drain) before the job finished.
- refuse (on a queue other appliances share: RabbitMQ, SQS): no slot of this appliance could
  ever run it. Back to the queue for the others, uncounted, with this appliance added to its
  refusal record; this runner leaves it alone for a while (per message, 30 s doubling to 10
  min), and a queue holding nothing else is not claimed from until a message arrives or a
  wait ends (see appliance/queues/refusals.py).
- dead_letter with the reason: malformed (BadRequest), no slot of this appliance could ever
  run it (local queue; shared queues: once queues.unrunnable_after_refusals appliances refused
  it or it has been refused for queues.unrunnable_after), expired before it started,
  credentials refused / workspace missing, or the job failed for good (exit code, out of
  memory, timed out, environment build failed). Its `output` is uploaded first, so the user
  sees why.

SIGTERM/SIGINT: drain. Idle: exit at once. Busy: the job may finish within
`drain_timeout_s`; after that it gets SIGTERM (to checkpoint), SIGKILL after `term_grace_s`,
its artifacts are uploaded and its message released, and the runner exits 0. supervisord's
`stopwaitsecs` must therefore exceed drain_timeout_s + term_grace_s + an upload.

A runner killed with SIGKILL takes its workload with it (PDEATHSIG); the queue source gives
the orphaned claim back (`recover_orphans`) and the job runs again from its last upload.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from appliance import notify
from appliance.runner import artifacts as arts
from appliance.runner import classes, execute, gpu, pyenv
from appliance.runner.artifacts import ArtifactError, RetryPolicy, StoreUnavailable, Uploader
from appliance.runner.cache import ArtifactCache
from appliance.runner.counters import SlotCounters
from appliance.runner.request import BadRequest, Request, parse_request, unmet
from appliance.files import write_atomic
from appliance.queues import refusals
from appliance.queues.base import over_attempts
from appliance.runner.status import StatusFile, record_experiment
from appliance.slot import users

log = logging.getLogger("appliance.runner")

GiB = 1024 ** 3
QUIET_BLIND_S = 10.0  # a queue of refused messages whose depth we cannot see is looked at this often
UNKNOWN_GPU_MEMORY = 1 << 62  # the plan does not record GPU memory: do not check it


@dataclass
class RunnerSettings:
    """What the runner takes from the config (`[runner]` of appliance.toml)."""

    artifact_cache_bytes: int = 10 * GiB
    venv_cache_max: int = 8
    venv_cache_bytes: int = 100 * GiB
    installer: str = "uv"  # runner.installer: "uv" (shared cache) or "pip"
    env_cache_bytes: int = 20 * GiB  # runner.env_cache: the uv cache's bound
    python: str = ""  # non-empty: run workloads in this interpreter, build no venvs
    drain_timeout_s: float = 600.0
    max_unpack_bytes: int = 20 * GiB
    default_lifetime_s: float = 86400.0
    term_grace_s: float = 10.0
    keepalive_s: float = 60.0
    idle_wait_s: float = 10.0
    tick_s: float = 1.0
    store_backoff_s: float = 5.0  # first pause after the store was down; doubles
    store_backoff_max_s: float = 300.0
    store_wait_s: float = 1800.0  # a finished job's uploads are retried this long, holding its message
    resume_every_s: float = 30.0  # how often finished jobs whose uploads failed are tried again
    workload_user: str = "auto"  # isolation.user (see appliance/slot/users.py)
    max_attempts: int = 3  # claims of one message before it is quarantined (dead letter)
    retries: int = 2  # runs again after an infrastructure failure (runner/classes.py)
    retry_backoff_s: float = 5.0  # held this long before such a run again; doubles per retry
    retry_backoff_max_s: float = 120.0
    hang_after_s: float = 0.0  # no CPU progress and no output this long: stopped as hung (0: never)
    gpu_watch_s: float = 2.0  # how often a running job's GPU memory is looked at (NVML)
    gpu_share: str = "none"  # isolation.gpu_share: "none" or "mps"
    unrunnable_after_refusals: int = 3  # distinct appliances refusing a shared message: dead letter
    unrunnable_after_s: float = 86400.0  # or refused this long since its first refusal (0: never)
    refusal_backoff_s: float = refusals.BACKOFF_S  # a refused message is left alone this long; doubles
    refusal_backoff_max_s: float = refusals.BACKOFF_MAX_S
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def from_config(cls, config) -> "RunnerSettings":
        r = config.runner
        return cls(artifact_cache_bytes=r.artifact_cache, venv_cache_max=r.venv_cache,
                   python=r.python, drain_timeout_s=r.drain_timeout,
                   max_unpack_bytes=r.max_unpack, default_lifetime_s=r.default_lifetime,
                   workload_user=config.isolation.user,
                   max_attempts=r.max_attempts, retries=r.retries, hang_after_s=r.hang_after,
                   gpu_share=config.isolation.gpu_share,
                   unrunnable_after_refusals=config.queues.unrunnable_after_refusals,
                   unrunnable_after_s=config.queues.unrunnable_after,
                   installer=r.installer, env_cache_bytes=r.env_cache)


@dataclass
class SlotShape:
    name: str
    cpus: int
    memory_bytes: int
    gpus: int
    gpu_mem_bytes: int = UNKNOWN_GPU_MEMORY


def _env_cpus(text: str) -> int:
    """How many CPUs APPLIANCE_SLOT_CPUS (a Linux CPU list like "2-3,6") names."""
    from appliance.slot.limits import parse_cpu_list
    try:
        return max(1, len(parse_cpu_list(text)))
    except Exception:
        return len(os.sched_getaffinity(0))


def slot_shapes(home) -> list[SlotShape]:
    """Every slot of the applied plan (`plan.json`); [] when there is none."""
    try:
        data = json.loads(Path(home.plan_file).read_text())
    except (OSError, ValueError):
        return []
    out = []
    for s in data.get("slots", []):
        try:
            out.append(SlotShape(name=s["name"], cpus=len(s.get("cpus", [])),
                                 memory_bytes=int(s.get("memory_bytes", 0)),
                                 gpus=len(s.get("gpus", [])),
                                 # per GPU, what this slot may use (a share, a MIG device's); an
                                 # older plan.json does not say
                                 gpu_mem_bytes=int(s.get("gpu_memory_bytes") or 0) or UNKNOWN_GPU_MEMORY))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def this_slot(home, slot: str, environ=os.environ) -> SlotShape:
    """This runner's shape: from the plan, else the slot environment, else the host."""
    for s in slot_shapes(home):
        if s.name == slot:
            return s
    cpus = _env_cpus(environ["APPLIANCE_SLOT_CPUS"]) if environ.get("APPLIANCE_SLOT_CPUS") \
        else len(os.sched_getaffinity(0))
    mem = environ.get("APPLIANCE_SLOT_MEMORY_BYTES")
    if mem and mem.isdigit():
        memory = int(mem)
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cuda = environ.get("CUDA_VISIBLE_DEVICES", "")
    gpus = len([g for g in cuda.split(",") if g.strip() and g.strip() != "-1"])
    gpu_mem = environ.get("APPLIANCE_GPU_MEMORY_BYTES", "")
    return SlotShape(name=slot, cpus=cpus, memory_bytes=memory, gpus=gpus,
                     gpu_mem_bytes=int(gpu_mem) if gpu_mem.isdigit() and int(gpu_mem) else UNKNOWN_GPU_MEMORY)


def _holders(held: dict):
    return [p["pid"] for p in held["processes"]] or held["reason"]


def job_dir_name(key: str) -> str:
    """The job folder of experiment `key`: readable, and distinct for distinct keys ("a b" and
    "a_b" must never share a folder: it may hold one's finished outputs)."""
    return f"{_safe(key)[:120]}.{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


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
        self.status = StatusFile(home, slot)
        self.cache = ArtifactCache(home.artifact_cache, self.settings.artifact_cache_bytes)
        self.venvs = pyenv.VenvCache(home.venv_cache, max_bytes=self.settings.venv_cache_bytes,
                                     max_count=self.settings.venv_cache_max,
                                     build_env=execute.base_env(self.environ),
                                     uv_cache=pyenv.UvCache(home.uv_cache, self.settings.env_cache_bytes)
                                     if self.settings.installer == "uv" else None)
        self.status.counters = SlotCounters(home, slot, artifact_cache=self.cache, env_cache=self.venvs,
                                            store_errors=arts.STORE_ERRORS)
        self.stop_requested_at: Optional[float] = None
        self.cursor = 0
        self.endpoint_pause: dict[str, float] = {}  # store endpoint -> no fetch before
        self.store_backoff = self.settings.store_backoff_s
        self.held_back = False  # the last pass put back messages this slot cannot run now
        self.next_resume = 0.0
        # NVML for this slot's GPUs, opened once (no GPUs: nothing is asked)
        own = self.user if self.user and self.user.name == users.account_name(slot) else None
        self.gpus = gpu.slot_gpus(self.environ, self.cgroup_slot, own.uid if own else None,
                                  self.settings.gpu_share, in_container=bool(self.container_slot))
        self.gpu_held: Optional[dict] = None
        self.refused = refusals.Backoff(self.settings.refusal_backoff_s, self.settings.refusal_backoff_max_s)
        self.quiet: dict[tuple, tuple] = {}  # (source, queue) -> (until, depth): holds only refused messages
        self._appliance_id: Optional[str] = None
        self._plan_sig = None
        self.sources = notify.announce_settlements(self)  # finished, failed, dead-lettered: events

    def _workload_user(self):
        if os.geteuid() != 0:
            return None  # cannot switch users: workloads run as the runner (dev, tests as a user)
        from appliance.slot import users
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
            self.gpus.close()
            for src in self.sources:
                try:
                    src.close()
                except Exception:
                    log.exception("closing queue source %s", getattr(src, "name", src))
            self.status.update(state="stopped")
        return 0

    def _idle(self, seconds: float) -> None:
        """Wait for work, in short steps so a SIGTERM is seen at once."""
        self.launcher.warm()
        end = time.monotonic() + max(0.0, seconds)
        waiter = next((s for s in self.sources if hasattr(s, "wait")), None)
        while not self.stopping:
            left = end - time.monotonic()
            if left <= 0:
                return
            step = min(1.0, left)
            if waiter is not None and not self.held_back:
                if waiter.wait(step):
                    return
            else:
                time.sleep(step)

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
        self.launcher.warm()  # gets ready while we claim and fetch (no-op if it is waiting)
        found = self.next_message()
        if found is None:
            return False
        src, msg, req = found
        self.process(src, msg, req)
        return True

    def gpu_busy(self) -> Optional[str]:
        """Why this slot's GPUs cannot take a job now (a foreign process on them, MPS missing),
        kept in `status` as gpu_held; None when they can."""
        held = None
        if self.gpus.blocked:
            held = {"reason": self.gpus.blocked, "processes": []}
        else:
            try:
                foreign = self.gpus.foreign()
            except Exception:  # noqa: BLE001 - a watch failure must not stop the runner
                log.exception("slot %s: looking for foreign GPU processes", self.slot)
                foreign = []
            if foreign:
                held = {"reason": f"GPU in use by a process outside this appliance: {gpu.describe(foreign)}",
                        "processes": [{"gpu": p.gpu, "pid": p.pid, "memory_bytes": p.memory_bytes}
                                      for p in foreign]}
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
        self._keep_refusals_current()
        if self.gpu_busy():  # claim nothing: the messages stay in their queues, untouched
            self.held_back = True
            return None
        pairs = self._pairs()
        for i in range(len(pairs)):
            idx = (self.cursor + i) % len(pairs)
            src, queue = pairs[idx]
            if self._is_quiet(src, queue):
                continue
            held, waiting, found = [], [], False
            try:
                for _ in range(32):  # look past messages only other slots can run
                    try:
                        msg = src.claim(queue)
                    except Exception as e:
                        log.warning("claim from %s/%s: %s", src.name, queue, e)
                        break
                    if msg is None:
                        break
                    try:
                        verdict = self.triage(src, msg)
                    except Exception as e:  # whatever it is, this message caused it: settle it
                        log.exception("triage of %s/%s", msg.queue, msg.message_id)
                        verdict = self._settle_broken(src, msg, f"{type(e).__name__}: {e}")
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
                    self._give_back_refused(src, m, verdict)
                if held:
                    self.held_back = True
                elif waiting and not found:
                    self._go_quiet(src, queue, [m for m, _ in waiting])
        return None

    # ------------------------------------------------------------------ shared queues: refusals

    @property
    def appliance_id(self) -> str:
        if self._appliance_id is None:
            from appliance.identity import appliance_id
            self._appliance_id = appliance_id(self.home)
        return self._appliance_id

    def _keep_refusals_current(self) -> None:
        """A new plan (a GPU came, slots changed) may run what was refused: forget the refusals.
        Refusals of messages not seen again for long (another box ran them) go too."""
        try:
            st = os.stat(self.home.plan_file)
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            sig = None
        changed = False
        if sig != self._plan_sig:
            changed = self._plan_sig is not None and bool(self.refused.held)
            self._plan_sig = sig
            if changed:
                log.info("the plan changed: requests refused before are looked at again")
                self.refused.clear()
                self.quiet.clear()
        if self.refused.prune(time.time()) or changed:
            self._write_refusals()

    def _write_refusals(self) -> None:
        try:
            refusals.write(self.home, self.slot, self.appliance_id, self.refused)
        except OSError as e:
            log.warning("writing %s: %s", refusals.refusals_file(self.home, self.slot), e)

    def _refuse(self, src, msg, req: Request, why: str) -> str:
        """No slot here can run this message of a shared queue: "refused" (back for the other
        appliances when the pass ends) or, once the fleet has shown nobody can, dead-lettered."""
        now = time.time()
        key = refusals.message_key(msg.body)
        record = refusals.add(msg.refusals, self.appliance_id, why, now)
        final = refusals.unrunnable(record, self.settings.unrunnable_after_refusals,
                                    self.settings.unrunnable_after_s, now)
        if final:
            log.warning("dead-lettering %s: %s", req.key, final)
            src.dead_letter(msg, final)
            self.refused.forget(key)
            self._write_refusals()
            return "settled"
        held = self.refused.refused(key, msg.source, msg.queue, req.key, why, list(record["by"]), now)
        msg.refusals = record
        self._write_refusals()
        log.info("refusing %s from %s/%s (no slot here can run it: %s); %d appliance(s) refused it; "
                 "not looking at it again for %.0fs", req.key, msg.source, msg.queue, why,
                 len(record["by"]), held.delay)
        return "refused"

    def _give_back_refused(self, src, msg, verdict: str) -> None:
        try:
            if verdict == "refused":
                src.refuse(msg, msg.refusals)
            else:
                put_back(src, msg)
        except Exception:  # noqa: BLE001 - the source logs; the broker hands it out again
            log.exception("giving back %s/%s", msg.queue, msg.message_id)

    def _go_quiet(self, src, queue: str, msgs: list) -> None:
        """Every message this pass found in `queue` was refused here: claim from it again when
        the first of their waits ends, or when a message arrives (its depth grows)."""
        now = time.time()
        ends = [h.until for h in (self.refused.held.get(refusals.message_key(m.body)) for m in msgs) if h]
        until = min(ends) if ends else now + self.settings.refusal_backoff_s
        depth = getattr(src, "depth", None)
        try:
            n = depth(queue) if depth else None
        except Exception:  # noqa: BLE001 - unknown depth: quiet until the first wait ends only
            n = None
        if n is None:
            until = min(until, now + QUIET_BLIND_S)
        self.quiet[(getattr(src, "name", ""), queue)] = (until, n)

    def _is_quiet(self, src, queue: str) -> bool:
        key = (getattr(src, "name", ""), queue)
        q = self.quiet.get(key)
        if q is None:
            return False
        until, depth = q
        if time.time() >= until:
            del self.quiet[key]
            return False
        if depth is None:
            return True
        try:
            now_depth = src.depth(queue)
        except Exception:  # noqa: BLE001
            now_depth = None
        if now_depth is None or now_depth > depth:
            del self.quiet[key]  # something new (or we cannot tell): look
            return False
        self.quiet[key] = (until, now_depth)  # fewer now: a new arrival shows as growth from here
        return True

    def _settle_broken(self, src, msg, what: str) -> str:
        try:
            src.dead_letter(msg, f"the runner cannot handle this request ({what})")
        except Exception:
            log.exception("dead-lettering %s", msg.message_id)
        return "settled"

    def triage(self, src, msg):
        """A Request to run now, "held" (give back: not here or not now), or "settled"."""
        too_often = over_attempts(msg, self.settings.max_attempts)
        if too_often:
            log.warning("quarantining %s/%s: %s", msg.queue, msg.message_id, too_often)
            src.dead_letter(msg, too_often)
            return "settled"
        if getattr(msg, "shared", False) and self.refused.waiting(refusals.message_key(msg.body), time.time()):
            return "waiting"  # refused here a moment ago: give it back untouched
        try:
            req = parse_request(msg.body)
        except BadRequest as e:
            log.warning("dead-lettering %s/%s: bad request: %s", msg.queue, msg.message_id, e)
            src.dead_letter(msg, f"bad request: {e}")
            return "settled"
        lifetime = req.lifetime_s or self.settings.default_lifetime_s
        if req.time_added and req.lifetime_s and req.time_added + lifetime < time.time():
            src.dead_letter(msg, f"expired: experimentLifetime of {lifetime:.0f}s since "
                                 f"time_added passed before it could start")
            return "settled"
        now = time.time()
        if any(self.endpoint_pause.get(a.endpoint_url, 0) > now for a in req.artifacts.values()):
            return "held"  # its store did not answer a moment ago: other queues first
        disk = shutil.disk_usage(self._work_root())
        me = this_slot(self.home, self.slot, self.environ)
        if self._unmet(req, me, disk.total) is None:
            if self._unmet(req, me, disk.free) is None:
                return req
            return "held"  # not now: the disk may free up (a neighbour's job ends)
        here = self._unmet(req, me, disk.total)
        others = [s for s in slot_shapes(self.home) if s.name != self.slot]
        if any(self._unmet(req, s, disk.total) is None for s in others):
            return "held"
        if getattr(msg, "shared", False):
            return self._refuse(src, msg, req, here)
        src.dead_letter(msg, f"no slot of this appliance can run it: {here}")
        log.warning("dead-lettering %s: no slot can run it: %s", req.key, here)
        return "settled"

    @staticmethod
    def _unmet(req: Request, s: SlotShape, disk: int) -> Optional[str]:
        return unmet(req.resources, cpus=s.cpus, memory_bytes=s.memory_bytes, gpus=s.gpus,
                     gpu_mem_bytes=s.gpu_mem_bytes, disk_bytes=disk)

    def store_down(self, endpoint: str) -> None:
        """Its store did not answer: no fetch from it for a while (backoff); other stores and
        queues go on."""
        self.endpoint_pause[endpoint] = time.time() + self.store_backoff
        self.store_backoff = min(self.store_backoff * 2, self.settings.store_backoff_max_s)

    def store_up(self, endpoint: str) -> None:
        self.endpoint_pause.pop(endpoint, None)
        self.store_backoff = self.settings.store_backoff_s

    # ------------------------------------------------------------------ one job

    def _work_root(self) -> Path:
        root = Path(self.home.work_dir) / _safe(self.slot)
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
        job_dir = root / job_dir_name(req.key)
        finished = finished_job_dir(self.home, req.key)
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
        root = self._work_root()
        for d in sorted(root.iterdir()):
            if not (d / ENDED).is_file() or self.stopping:
                continue
            try:
                finish_uploads(d, self.settings.retry, self.user_ids)
            except StoreUnavailable as e:
                log.info("finished job %s: uploads wait for the store: %s", d.name, e)
            except Exception as e:  # noqa: BLE001 - one broken leftover must not stop the runner
                log.warning("finished job %s: cannot complete its uploads: %s", d.name, e)


# ---------------------------------------------------------------- finished jobs

ENDED = ".ended.json"  # JOB/.ended.json: the workload ended, how; written before any upload
REQUEST = ".request.json"  # JOB/.request.json: the message body, to finish the uploads later
LOCK = ".lock"  # held by the runner working on JOB


def finished_job_dir(home, key: str) -> Optional[Path]:
    """A job dir on this box (any slot) whose workload ended but whose uploads are not known to
    be done, and that no live runner holds; None if there is none."""
    for d in Path(home.work_dir).glob(f"*/{job_dir_name(key)}"):
        try:
            ended = json.loads((d / ENDED).read_text())
        except (OSError, ValueError):
            continue
        if ended.get("experiment") == key and _unlocked(d):
            return d
    return None


def _unlocked(job_dir: Path) -> bool:
    try:
        with open(job_dir / LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def finish_uploads(job_dir: Path, retry: RetryPolicy, user: Optional[tuple]) -> dict:
    """Upload every mutable artifact of a finished job dir, then mark it done in the store and
    remove the dir. Returns the ended record. StoreUnavailable leaves everything in place."""
    with open(job_dir / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ended = json.loads((job_dir / ENDED).read_text())
        req = parse_request((job_dir / REQUEST).read_bytes())
        Uploader(req.artifacts, job_dir, retry, user[0] if user else None).upload_changed()
        record = arts.result_record(req.artifacts)
        if record is not None:
            arts.write_record(record, {**ended, "state": "done"}, retry)
        shutil.rmtree(job_dir, ignore_errors=True)
    return ended


DISK_FULL_BYTES = 64 << 20


def disk_full(path: Path) -> bool:
    """Less than 64 MiB free where the job lives: writes are failing or about to."""
    try:
        return shutil.disk_usage(path).free < DISK_FULL_BYTES
    except OSError:
        return False


def put_back(src, msg) -> None:
    """Give a message back without counting a try: it was not started (not here, not now, the
    store is down, the runner drains)."""
    src.release(msg, counted=False)


def release_or_quarantine(src, msg, error: BaseException, max_attempts: int) -> None:
    """A failure of the appliance itself (or of its disk) on this message: try again elsewhere or
    later, up to runner.max_attempts; then it is dead-lettered with the error."""
    attempt = int(getattr(msg, "attempt", 1) or 1)
    what = f"{type(error).__name__}: {error}"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        what = f"the disk is full ({error})"
    try:
        if attempt >= max_attempts:
            src.dead_letter(msg, f"the runner failed on this request {attempt} times; the last: {what} "
                                 f"[class: {classes.INFRASTRUCTURE}]")
        else:
            src.release(msg)
    except Exception:
        log.exception("settling %s after a runner error", msg.message_id)


class _Settle:
    """The message of one job, settled at most once."""

    def __init__(self, src, msg):
        self.src, self.msg, self.done = src, msg, False

    def __call__(self, how: str, *args) -> None:
        if self.done:
            return
        self.done = True
        try:
            getattr(self.src, how)(self.msg, *args)
        except Exception as e:  # e.g. the broker restarted: the result record settles it later
            log.warning("%s of %s failed: %s", how, self.msg.message_id, e)


class Job:
    """One claimed request on its way through the runner (see module doc)."""

    def __init__(self, runner: Runner, src, msg, req: Request, job_dir: Path, resumed: bool = False):
        self.r, self.src, self.msg, self.req, self.dir = runner, src, msg, req, job_dir
        self.s = runner.settings
        self.status = runner.status
        self.settle_msg = _Settle(src, msg)
        self.output = job_dir / "output" / arts.OUTPUT_FILE
        self.uploader = Uploader(req.artifacts, job_dir, self.s.retry,
                                 runner.user.uid if runner.user else None)
        self.record = arts.result_record(req.artifacts)
        self.env: Optional[pyenv.PythonEnv] = None
        self.gpu: Optional[gpu.JobGpu] = None  # the job's GPU watch while it runs
        self.next_keepalive = time.time() + self.s.keepalive_s
        self.started = time.time()
        self.keep_dir = False  # the workload ended but its outputs are not all in the store
        self.lock = open(job_dir / LOCK, "a")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        if not resumed:
            self._make_dirs()

    def close(self) -> None:
        execute.end_job(self.r.cgroup_slot, self.r.user_ids)  # its processes, its /dev/shm
        if self.env is not None:
            self.env.release()
        self.lock.close()

    def _make_dirs(self) -> None:
        """The job dir is the runner's (root, 0711); what the workload may write is its own."""
        (self.dir / REQUEST).write_bytes(self.msg.body)
        os.chmod(self.dir / REQUEST, 0o600)
        out = self.output.parent
        out.mkdir(mode=0o700)
        for name in (".tmp", ".home"):
            self._own(self.dir / name)

    def _own(self, path: Path) -> None:
        """`path` (made if missing, and everything in it) belongs to the workload's user, 0700."""
        path.mkdir(mode=0o700, exist_ok=True)
        user = self.r.user
        if user is None:
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
            hang_after_s=self.s.hang_after_s if periodic_save else 0.0)

    def note(self, text: str) -> None:
        """A line from the appliance in the experiment's output (a root-owned folder: no link
        the workload planted can redirect it)."""
        self.output.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "a") as f:
            f.write(f"appliance: {text}\n")

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
        self.status.job_finished(outcome, exit_code, reason, gpu=gpu_use, cls=cls, report=report)
        log.info("%s: %s [%s] %s", self.req.key, outcome, cls, reason)

    def unpack_limit(self) -> int:
        """The most an artifact may unpack to: runner.max_unpack, the request's hdd, and this
        slot's share of the work disk, whichever is smallest."""
        disk = shutil.disk_usage(self.dir)
        share = disk.total // max(1, len(slot_shapes(self.r.home)) or 1)
        limits = [self.s.max_unpack_bytes, share]
        if self.req.resources.hdd_bytes:
            limits.append(self.req.resources.hdd_bytes)
        return min(limits)

    # -- the steps

    def run(self) -> None:
        req, msg = self.req, self.msg
        self.status.job_started(req.key, msg.queue, msg.source, enqueued=req.time_added)
        record_experiment(self.r.home, req.key, {
            "experiment": req.key, "slot": self.r.slot, "queue": msg.queue,
            "claimed": self.started, "output": str(self.output),
            "artifacts": {n: {"endpoint_url": a.endpoint_url, "bucket": a.bucket, "key": a.key,
                              "mutable": a.mutable} for n, a in req.artifacts.items()}})
        log.info("running %s from %s/%s (attempt %s)", req.key, msg.source, msg.queue,
                 getattr(msg, "attempt", 1))

        if not self.fetch():
            return
        self.status.update(state="preparing", output=str(self.output))
        if self.output.exists() and self.output.stat().st_size:
            self.note(f"running again on slot {self.r.slot} (an earlier attempt was cut short)")
        result = self.prepare_env()
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
        limit = self.unpack_limit()
        try:
            known = arts.listed(mutable + ([self.record] if self.record else []), self.s.retry)
            for art in order:
                self.tick()
                if self.r.stopping:
                    return self.give_back("runner stopping before the job started")
                arts.fetch(art, self.dir / art.name, None if art.mutable else self.r.cache,
                           self.s.retry, limit, exists=known.get(art.name) if art.mutable else None)
                if art.name != "output":
                    self._own(self.dir / art.name)
                if art.name == "workspace" and self.record is not None and known.get(self.record.name, True):
                    done = arts.read_record(self.record, self.s.retry)  # ran before? (the credentials work)
                    if done is not None and self.already_ran(done):
                        return False
        except StoreUnavailable as e:
            self.r.store_down(next(iter(self.req.artifacts.values())).endpoint_url)
            return self.give_back(f"store unavailable: {e}")
        except Exception as e:  # AccessDenied, ArtifactMissing, UnsafeArchive, bad tar, bad name
            reason = str(e) if isinstance(e, ArtifactError) else \
                f"fetching artifacts: {type(e).__name__}: {e}"
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise  # the disk's fault, not the request's: released and counted by process()
            self.note(reason)
            self.upload_quietly()
            self.settle_msg("dead_letter", f"{reason} [class: {classes.classify('failed', None, reason)}]")
            self.finish("failed", None, reason)
            return False
        self.r.store_up(next(iter(self.req.artifacts.values())).endpoint_url)
        self.uploader.mark_current()  # what is on disk now is what the store has
        return True

    def already_ran(self, record: dict) -> bool:
        """The result record in the store says this request ran before. Done: settle it as it
        ended, without running it again. Ended but not done (uploads in flight elsewhere): hold
        it back for a while; past that, its box is taken for dead and it runs again."""
        outcome, reason = record.get("outcome"), record.get("reason", "")
        if record.get("state") == "done":
            log.info("%s already ran (%s): settling without running it again", self.req.key, outcome)
            if outcome == execute.SUCCESS:
                self.settle_msg("ack")
            else:
                cls = record.get("class") or classes.classify(outcome or "failed", record.get("exit_code"), reason)
                self.settle_msg("dead_letter", f"{outcome}: {reason} [class: {cls}]")
            self.finish(outcome or "failed", record.get("exit_code"), f"already ran: {reason}".strip())
            return True
        if time.time() - float(record.get("finished") or 0) < self.s.store_wait_s:
            self.give_back(f"its workload ended on {record.get('slot', '?')}; waiting for those uploads")
            return True
        return False

    def give_back(self, reason: str) -> bool:
        """Put the message back before its workload started (not counted as a try)."""
        log.warning("releasing %s: %s", self.req.key, reason)
        self.settle_msg.done = True
        put_back(self.src, self.msg)
        self.finish("released", None, reason)
        return False

    def prepare_env(self) -> Optional[execute.Result]:
        s = self.s
        try:
            if s.python:
                self.env = pyenv.system_env(s.python)
            else:
                reqs = pyenv.requirement_set(self.req.pythonenv, self.req.pip)
                for line in reqs.skipped:
                    self.note(f"not installed (it exists only on the client's machine): {line}")
                user = self.r.user
                python = pyenv.interpreter_for(self.req.pythonver, lambda p: user is None or
                                               users.executable_by(p, user.uid, user.gid))
                build_as = None
                if user is not None:  # untrusted setup.py: as the workload, inside its cgroup
                    build_as = pyenv.BuildUser(user.uid, user.gid,
                                               preexec=execute._preexec(self.r.cgroup_slot, os.getpid()))
                progress = pyenv.Progress(line=lambda text: self.note(f"env: {text}"),
                                          step=lambda text: self.status.update(step=text))
                try:
                    self.env = self.r.venvs.prepare(reqs.lines, python, self.supervision(False),
                                                    build_as=build_as, progress=progress)
                finally:
                    self.status.update(step=None)
                log.info("%s: venv %s %s", self.req.key, self.env.key,
                         "reused" if self.env.reused else "built")
                if not self.env.reused:
                    execute.kill_job_leftovers(self.r.cgroup_slot)  # what a setup.py left running
        except pyenv.BadRequirement as e:
            self.note(str(e))
            return execute.Result(execute.ENV_FAILED, None, str(e))
        except pyenv.EnvBuildFailed as e:
            self.note(str(e))
            return execute.Result(execute.ENV_FAILED, None,
                                  f"building the Python environment failed: {e.summary}", detail=str(e)[-4000:])
        except pyenv.Interrupted:
            if self.r.stopping:
                return execute.Result(execute.INTERRUPTED, None, "runner stopping (drain)")
            return execute.Result(execute.TIMED_OUT, None,
                                  "lifetime exceeded while building the environment")
        except Exception as e:
            return execute.Result(execute.ENV_FAILED, None, f"environment: {e}")
        user = self.r.user
        if user is not None and not users.executable_by(self.env.python, user.uid, user.gid):
            return execute.Result(execute.ENV_FAILED, None,
                                  f"the interpreter {self.env.python} cannot be run by the workload user "
                                  f"{user.name} (a folder on its path is private, e.g. /root): set "
                                  f"runner.python, or build venvs from a system interpreter such as "
                                  f"/usr/bin/python3")
        return None

    def argv(self) -> list[str]:
        fn = self.req.filename.strip()
        if fn.startswith("-m"):
            head = ["-m", fn[2:].strip()]
        else:
            head = [fn]
        return [self.env.python, *head, *self.req.args]

    def workload_env(self) -> dict[str, str]:
        base = execute.base_env(self.r.environ)
        extra = {
            "STUDIOML_EXPERIMENT": self.req.key,
            "STUDIOML_ARTIFACT_MAPPING": str(self.dir / "artifacts.json"),
            "TMPDIR": str(self.dir / ".tmp"),
            "HOME": str(self.dir / ".home"),
        }
        if self.r.user is not None:
            extra["USER"] = extra["LOGNAME"] = self.r.user.name
        mapping = {n: str(self.dir / n) for n in self.req.artifacts}
        (self.dir / "artifacts.json").write_text(json.dumps(mapping))
        if self.env.bin_dir is not None:
            extra.update(self.env.env_vars())
            extra["PATH"] = f"{self.env.bin_dir}:{base.get('PATH', os.defpath)}"
        extra.update(self.r.gpus.env)  # the frameworks' own GPU memory knobs, MPS (runner/gpu.py)
        cpus = self.r.environ.get("APPLIANCE_SLOT_CPUS")
        if cpus:
            n = str(_env_cpus(cpus))
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                extra[var] = n
        return execute.workload_env(self.r.environ, self.req.env, extra)

    def execute(self) -> execute.Result:
        self.status.update(state="draining" if self.r.stopping else "running")

        def started(proc):
            self.status.update(workload={"pid": proc.pid,
                                         "start_ticks": execute.process_start_ticks(proc.pid)})

        sv = self.supervision(True)
        if self.r.gpus.active:
            self.gpu = gpu.JobGpu(self.r.gpus, self.s.gpu_watch_s)
            sv.check = self.gpu_check
        return execute.run_workload(
            self.argv(), self.dir / "workspace", self.workload_env(), self.output,
            sv, slot=self.r.cgroup_slot, on_start=started,
            container_slot=self.r.container_slot, launcher=self.r.launcher, user=self.r.user_ids,
            on_end=self.gpu_end, ram_bytes=self.req.resources.ram_bytes)

    def gpu_check(self) -> Optional[str]:
        """The supervision tick's GPU look (every runner.gpu_watch_s): a reason to stop the job
        when it is over its slot's share; its memory and utilisation into `status`."""
        try:
            looked = self.gpu.next_look
            reason = self.gpu.look()
            if self.gpu.next_look != looked:
                self.status.update(gpu=self.gpu.summary())
            return reason
        except Exception:  # noqa: BLE001 - a watch failure must not take the job down
            log.exception("%s: GPU watch", self.req.key)
            return None

    def gpu_end(self) -> None:
        """The workload ended: last look, then kill its GPU processes still alive."""
        if self.gpu is None:
            return
        try:
            self.gpu.look(force=True)
            killed = self.r.gpus.kill_job_processes()
        except Exception:  # noqa: BLE001
            log.exception("%s: GPU leftovers", self.req.key)
            return
        if killed:
            what = gpu.describe(killed)
            log.warning("%s: killed GPU processes the job left running: %s", self.req.key, what)
            self.note(f"killed GPU processes the job left running: {what}")

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
        release_or_quarantine(self.src, self.msg, error, self.s.max_attempts)
        what = "the disk is full" if isinstance(error, OSError) and error.errno == errno.ENOSPC \
            else f"runner error: {type(error).__name__}: {error}"
        self.status.job_finished("released", None, what)

    def settle(self, result: execute.Result) -> None:
        self.status.update(state="uploading", workload=None)
        if result.outcome == execute.INTERRUPTED:  # drained: never ended, runs again, not counted
            self.upload_quietly()
            self.settle_msg.done = True
            put_back(self.src, self.msg)
            self.finish(result.outcome, result.exit_code, result.reason)
            return
        if result.outcome == execute.FAILED and disk_full(self.dir):
            # the workload most likely failed for want of disk: the box's fault, not the user's
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
        ended["report"] = self.report(result)
        self.note(f"{result.outcome}: {classes.report_line(ended['report'])}")
        write_atomic(self.dir / ENDED, json.dumps(ended), mode=0o600, durable=True)  # never runs again
        self.keep_dir = True
        self._write_record(ended)
        self.complete(ended)

    def report(self, result: execute.Result) -> dict:
        """The per-job report: what the workload used, where it ran, and how it ended."""
        cpus = self.r.environ.get("APPLIANCE_SLOT_CPUS")
        out = {"class": classes.classify(result.outcome, result.exit_code, f"{result.reason}\n{result.detail}"),
               "slot": self.r.slot, "cpus": cpus or None,
               "gpus": self.r.environ.get("CUDA_VISIBLE_DEVICES") or None,
               "wall_seconds": round(time.time() - self.started, 3)}
        if result.usage:
            out.update(result.usage)
            out["wall_seconds"] = result.usage.get("wall_seconds")
        if self.gpu is not None:
            out["gpu_peak_memory_bytes"] = self.gpu.summary().get("peak_memory_bytes")
        return out

    def retry_later(self, result: execute.Result, cls: str) -> bool:
        """An infrastructure failure with retries left: hold the message for a backoff, then
        release it counted, so the next claim (any slot, any appliance) is attempt + 1. The
        attempt count the message carries is the retry count (retry n = attempt n + 1): one
        counter for both limits, so a job runs at most 1 + min(runner.retries,
        runner.max_attempts - 1) times. False when no retry is left (then it is dead-lettered)."""
        done = getattr(self.msg, "attempt", 1) - 1  # retries behind it
        if done >= self.s.retries or done + 1 >= self.s.max_attempts:
            return False
        self.note(f"{result.outcome} ({cls}): {result.reason}; running it again "
                  f"(retry {done + 1} of {self.s.retries})")
        self.upload_quietly()
        wait = min(self.s.retry_backoff_s * (2 ** done), self.s.retry_backoff_max_s)
        end = time.time() + wait
        while time.time() < end and not self.r.stopping:
            self.tick()
            time.sleep(min(1.0, self.s.tick_s, max(0.0, end - time.time())))
        self.settle_msg.done = True
        self.src.release(self.msg)
        self.status.job_finished(result.outcome, result.exit_code, result.reason,
                                 cls=cls, retry=done + 1)
        log.warning("%s: %s [%s] %s: retry %d of %d", self.req.key, result.outcome, cls, result.reason,
                    done + 1, self.s.retries)
        return True

    def _write_record(self, data: dict) -> None:
        if self.record is not None:
            try:
                arts.write_record(self.record, data, self.s.retry)
            except ArtifactError as e:
                log.warning("%s: result record: %s", self.req.key, e)

    def complete(self, ended: dict) -> None:
        """The workload ended as `ended` says: upload its outputs, record that in the store, and
        settle the message as the workload ended (never run again)."""
        if not self.upload_until_done():
            return
        self._write_record({**ended, "state": "done"})
        self.keep_dir = False
        self.status.update(last_upload=self.uploader.last_upload)
        outcome, reason = ended.get("outcome", execute.FAILED), ended.get("reason", "")
        cls = ended.get("class") or classes.classify(outcome, ended.get("exit_code"), reason)
        if outcome == execute.SUCCESS:
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
                self.settle_msg("dead_letter", f"finished, but uploading failed: {e}")
                self.finish("failed", None, f"uploading failed: {e}")
                return False

    def resume(self) -> None:
        """This request's workload already ended on this box: upload what is left, then settle."""
        ended = json.loads((self.dir / ENDED).read_text())
        log.info("%s: its workload ended before (%s); finishing the uploads, not running it again",
                 self.req.key, ended.get("outcome"))
        self.status.job_started(self.req.key, self.msg.queue, self.msg.source)
        self.keep_dir = True
        self.complete(ended)
