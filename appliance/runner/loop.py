"""The runner: one single-threaded loop per slot, from queue message to uploaded results.

    claim (round-robin over sources and queues) -> parse -> fits this slot? -> fetch artifacts
    -> Python environment -> run the workload -> upload mutable artifacts -> settle message

How each message is settled:
- ack: the workload succeeded and its results are in the store.
- release (back to the queue, runs again): another slot can run it but this one cannot; the
  store did not answer (after retries; this runner then pauses claiming, with backoff); the
  runner was stopped (drain) before the job finished.
- dead_letter with the reason: malformed (BadRequest), no slot of this appliance could ever
  run it, expired before it started, credentials refused / workspace missing, or the job
  failed for good (exit code, out of memory, timed out, environment build failed). Its
  `output` is uploaded first, so the user sees why.

SIGTERM/SIGINT: drain. Idle: exit at once. Busy: the job may finish within
`drain_timeout_s`; after that it gets SIGTERM (to checkpoint), SIGKILL after `term_grace_s`,
its artifacts are uploaded and its message released, and the runner exits 0. supervisord's
`stopwaitsecs` must therefore exceed drain_timeout_s + term_grace_s + an upload.

A runner killed with SIGKILL takes its workload with it (PDEATHSIG); the queue source gives
the orphaned claim back (`recover_orphans`) and the job runs again from its last upload.
"""

from __future__ import annotations

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

from appliance.runner import artifacts as arts
from appliance.runner import execute, pyenv
from appliance.runner.artifacts import ArtifactError, RetryPolicy, StoreUnavailable, Uploader
from appliance.runner.cache import ArtifactCache
from appliance.runner.request import BadRequest, Request, parse_request, unmet
from appliance.runner.status import StatusFile, record_experiment

log = logging.getLogger("appliance.runner")

GiB = 1024 ** 3
UNKNOWN_GPU_MEMORY = 1 << 62  # the plan does not record GPU memory: do not check it


@dataclass
class RunnerSettings:
    """What the runner takes from the config (`[runner]` of appliance.toml)."""

    artifact_cache_bytes: int = 10 * GiB
    venv_cache_max: int = 8
    venv_cache_bytes: int = 100 * GiB
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
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def from_config(cls, config) -> "RunnerSettings":
        r = config.runner
        return cls(artifact_cache_bytes=r.artifact_cache, venv_cache_max=r.venv_cache,
                   python=r.python, drain_timeout_s=r.drain_timeout,
                   max_unpack_bytes=r.max_unpack, default_lifetime_s=r.default_lifetime)


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
                                 gpus=len(s.get("gpus", []))))
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
    return SlotShape(name=slot, cpus=cpus, memory_bytes=memory, gpus=gpus)


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
        # the next workload's process, started while idle (saves a fork when a job comes)
        self.launcher = execute.Launcher(self.cgroup_slot)
        self.status = StatusFile(home, slot)
        self.cache = ArtifactCache(home.artifact_cache, self.settings.artifact_cache_bytes)
        self.venvs = pyenv.VenvCache(home.venv_cache, max_bytes=self.settings.venv_cache_bytes,
                                     max_count=self.settings.venv_cache_max,
                                     build_env=execute.base_env(self.environ))
        self.stop_requested_at: Optional[float] = None
        self.cursor = 0
        self.pause_until = 0.0
        self.store_backoff = self.settings.store_backoff_s
        self.held_back = False  # the last pass put back messages this slot cannot run

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
        for src in self.sources:
            recover = getattr(src, "recover_orphans", None)
            if recover:
                recover()
        self.status.update(state="idle", pid=os.getpid())
        try:
            while not self.stopping:
                if time.time() < self.pause_until:
                    self._idle(self.pause_until - time.time())
                    continue
                if self.run_once():
                    continue
                if exit_when_idle and not self.held_back:
                    break
                self._idle(self.settings.idle_wait_s if not self.held_back
                           else min(2.0, self.settings.idle_wait_s))
        finally:
            self.launcher.close()
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

    def next_message(self):
        """Round-robin: start at the queue after the one we last ran from."""
        self.held_back = False
        pairs = self._pairs()
        for i in range(len(pairs)):
            idx = (self.cursor + i) % len(pairs)
            src, queue = pairs[idx]
            held = []
            try:
                for _ in range(32):  # look past messages only other slots can run
                    try:
                        msg = src.claim(queue)
                    except Exception as e:
                        log.warning("claim from %s/%s: %s", src.name, queue, e)
                        break
                    if msg is None:
                        break
                    verdict = self.triage(src, msg)
                    if isinstance(verdict, Request):
                        self.cursor = idx + 1
                        return src, msg, verdict
                    if verdict == "held":
                        held.append(msg)
            finally:
                for m in held:
                    src.release(m)
                if held:
                    self.held_back = True
        return None

    def triage(self, src, msg):
        """A Request to run now, "held" (give back: another slot can run it), or "settled"."""
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
        disk = shutil.disk_usage(self._work_root())
        here = self._unmet(req, this_slot(self.home, self.slot, self.environ), disk.free)
        if here is None:
            return req
        others = [s for s in slot_shapes(self.home) if s.name != self.slot]
        if any(self._unmet(req, s, disk.total) is None for s in others):
            return "held"
        src.dead_letter(msg, f"no slot of this appliance can run it: {here}")
        log.warning("dead-lettering %s: no slot can run it: %s", req.key, here)
        return "settled"

    @staticmethod
    def _unmet(req: Request, s: SlotShape, disk: int) -> Optional[str]:
        return unmet(req.resources, cpus=s.cpus, memory_bytes=s.memory_bytes, gpus=s.gpus,
                     gpu_mem_bytes=s.gpu_mem_bytes, disk_bytes=disk)

    # ------------------------------------------------------------------ one job

    def _work_root(self) -> Path:
        root = Path(self.home.work_dir) / _safe(self.slot)
        root.mkdir(parents=True, exist_ok=True)
        return root

    def process(self, src, msg, req: Request) -> None:
        root = self._work_root()
        for old in root.iterdir():  # what a killed predecessor left
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        job_dir = root / _safe(req.key)
        job_dir.mkdir()
        job = Job(self, src, msg, req, job_dir)
        try:
            job.run()
        finally:
            job.close()
            shutil.rmtree(job_dir, ignore_errors=True)


class Job:
    """One claimed request on its way through the runner (see module doc)."""

    def __init__(self, runner: Runner, src, msg, req: Request, job_dir: Path):
        self.r, self.src, self.msg, self.req, self.dir = runner, src, msg, req, job_dir
        self.s = runner.settings
        self.status = runner.status
        self.output = job_dir / "output" / arts.OUTPUT_FILE
        self.uploader = Uploader(req.artifacts, job_dir, self.s.retry)
        self.env: Optional[pyenv.PythonEnv] = None
        self.next_keepalive = time.time() + self.s.keepalive_s
        self.started = time.time()

    def close(self) -> None:
        if self.env is not None:
            self.env.release()

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
            save=self.save, tick_s=self.s.tick_s, term_grace_s=self.s.term_grace_s)

    def note(self, text: str) -> None:
        """A line from the appliance in the experiment's output."""
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output, "a") as f:
            f.write(f"appliance: {text}\n")

    def save(self) -> None:
        """Periodic upload while the workload runs; a failure is logged and retried later."""
        try:
            if self.uploader.upload_changed():
                self.status.update(last_upload=self.uploader.last_upload)
        except ArtifactError as e:
            log.warning("periodic upload of %s: %s", self.req.key, e)

    def finish(self, outcome: str, exit_code, reason: str) -> None:
        self.status.job_finished(outcome, exit_code, reason)
        log.info("%s: %s %s", self.req.key, outcome, reason)

    # -- the steps

    def run(self) -> None:
        req, msg = self.req, self.msg
        self.status.job_started(req.key, msg.queue, msg.source)
        record_experiment(self.r.home, req.key, {
            "experiment": req.key, "slot": self.r.slot, "queue": msg.queue,
            "claimed": self.started, "output": str(self.output),
            "artifacts": {n: {"endpoint_url": a.endpoint_url, "bucket": a.bucket, "key": a.key,
                              "mutable": a.mutable} for n, a in req.artifacts.items()}})
        log.info("running %s from %s/%s", req.key, msg.source, msg.queue)

        if not self.fetch():
            return
        self.status.update(state="preparing", output=str(self.output))
        if self.output.exists() and self.output.stat().st_size:
            self.note(f"running again on slot {self.r.slot} (an earlier attempt was cut short)")
        result = self.prepare_env()
        if result is None:
            result = self.execute()
        self.settle(result)

    def fetch(self) -> bool:
        self.uploader.mark_current()  # nothing yet: a failure uploads only the output
        order = sorted(self.req.artifacts.values(), key=lambda a: a.name != "workspace")
        mutable = [a for a in order if a.mutable]
        known = None  # which mutable artifacts exist: one listing, not one request each
        for art in order:
            self.tick()
            if self.r.stopping:
                return self.give_back("runner stopping before the job started")
            try:
                if art.mutable and known is None:
                    known = arts.listed(mutable, self.s.retry)
                arts.fetch(art, self.dir / art.name, None if art.mutable else self.r.cache,
                           self.s.retry, self.s.max_unpack_bytes,
                           exists=known.get(art.name) if art.mutable else None)
            except StoreUnavailable as e:
                self.r.pause_until = time.time() + self.r.store_backoff
                self.r.store_backoff = min(self.r.store_backoff * 2, self.s.store_backoff_max_s)
                return self.give_back(f"store unavailable: {e}")
            except Exception as e:  # AccessDenied, ArtifactMissing, UnsafeArchive, bad tar
                reason = str(e) if isinstance(e, ArtifactError) else \
                    f"fetching artifact '{art.name}': {type(e).__name__}: {e}"
                self.note(reason)
                self.upload_quietly()
                self.src.dead_letter(self.msg, reason)
                self.finish("failed", None, reason)
                return False
        self.r.store_backoff = self.s.store_backoff_s
        self.uploader.mark_current()
        if not (self.dir / "workspace").is_dir():
            (self.dir / "workspace").mkdir()
        return True

    def give_back(self, reason: str) -> bool:
        log.warning("releasing %s: %s", self.req.key, reason)
        self.src.release(self.msg)
        self.finish("released", None, reason)
        return False

    def prepare_env(self) -> Optional[execute.Result]:
        s = self.s
        try:
            if s.python:
                self.env = pyenv.system_env(s.python)
            else:
                reqs = pyenv.requirement_set(self.req.pythonenv, self.req.pip)
                python = pyenv.interpreter_for(self.req.pythonver)
                self.env = self.r.venvs.prepare(reqs, python, self.supervision(False))
                log.info("%s: venv %s %s", self.req.key, self.env.key,
                         "reused" if self.env.reused else "built")
        except pyenv.EnvBuildFailed as e:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            with open(self.output, "a") as f:
                f.write(str(e))
            return execute.Result(execute.ENV_FAILED, None,
                                  "building the Python environment failed (pip's error is "
                                  "in the output)")
        except pyenv.Interrupted:
            if self.r.stopping:
                return execute.Result(execute.INTERRUPTED, None, "runner stopping (drain)")
            return execute.Result(execute.TIMED_OUT, None,
                                  "lifetime exceeded while building the environment")
        except Exception as e:
            return execute.Result(execute.ENV_FAILED, None, f"environment: {e}")
        return None

    def argv(self) -> list[str]:
        fn = self.req.filename.strip()
        if fn.startswith("-m ") or fn == "-m":
            head = ["-m", fn[2:].strip()] if fn != "-m" else ["-m"]
        else:
            head = [fn]
        return [self.env.python, *[h for h in head if h], *self.req.args]

    def workload_env(self) -> dict[str, str]:
        base = execute.base_env(self.r.environ)
        extra = {
            "STUDIOML_EXPERIMENT": self.req.key,
            "STUDIOML_ARTIFACT_MAPPING": str(self.dir / "artifacts.json"),
            "TMPDIR": str(self.dir / "tmp"),
        }
        (self.dir / "tmp").mkdir(exist_ok=True)
        mapping = {n: str(self.dir / n) for n in self.req.artifacts}
        (self.dir / "artifacts.json").write_text(json.dumps(mapping))
        if self.env.bin_dir is not None:
            extra.update(self.env.env_vars())
            extra["PATH"] = f"{self.env.bin_dir}:{base.get('PATH', os.defpath)}"
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

        return execute.run_workload(
            self.argv(), self.dir / "workspace", self.workload_env(), self.output,
            self.supervision(True), slot=self.r.cgroup_slot, on_start=started,
            container_slot=self.r.container_slot, launcher=self.r.launcher)

    def upload_quietly(self) -> None:
        try:
            self.uploader.upload_changed()
        except ArtifactError as e:
            log.warning("uploading %s: %s", self.req.key, e)

    def settle(self, result: execute.Result) -> None:
        self.status.update(state="uploading", workload=None)
        try:
            self.uploader.upload_changed()
            self.status.update(last_upload=self.uploader.last_upload)
        except StoreUnavailable as e:
            self.r.pause_until = time.time() + self.r.store_backoff
            self.src.release(self.msg)
            self.finish("released", result.exit_code,
                        f"{result.outcome}, but uploading failed ({e}); it will run again")
            return
        except ArtifactError as e:
            self.src.dead_letter(self.msg, f"{result.outcome}; uploading failed: {e}")
            self.finish("failed", result.exit_code, f"uploading failed: {e}")
            return
        if result.ok:
            self.src.ack(self.msg)
        elif result.outcome == execute.INTERRUPTED:
            self.src.release(self.msg)
        else:
            self.src.dead_letter(self.msg, f"{result.outcome}: {result.reason}")
        self.finish(result.outcome, result.exit_code, result.reason)
