"""What one job's workload runs in and what it used: its Python environment, its command line,
its environment variables, its GPU watch, its disk bound, and the per-job report. Functions of
a Job (job.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Optional

from appliance import pyenv
from appliance.runner import classes, execute, gpu, warm
from appliance.runner.triage import env_cpus, slot_shapes
from appliance.slot import users

log = logging.getLogger("appliance.runner")


def prepare_env(job) -> Optional[execute.Result]:
    """Build or reuse the job's Python environment (job.env); a Result when the job ends here."""
    s = job.s
    job.r.launcher.ready()  # its cgroup is made: a build joins the new one, never races its making
    try:
        if s.python:
            job.env = pyenv.system_env(s.python)
        else:
            reqs = pyenv.requirement_set(job.req.pythonenv, job.req.pip)
            for line in reqs.skipped:
                job.note(f"not installed (it exists only on the client's machine): {line}")
            user = job.r.user
            python = pyenv.interpreter_for(job.req.pythonver, lambda p: user is None or
                                           users.executable_by(p, user.uid, user.gid))
            build_as = None
            if user is not None:  # untrusted setup.py: as the workload, inside its cgroup
                build_as = pyenv.BuildUser(user.uid, user.gid,
                                           preexec=execute._preexec(job.r.cgroup_slot, os.getpid()))
            progress = pyenv.Progress(line=lambda text: job.note(f"env: {text}"),
                                      step=lambda text: job.status.update(step=text))
            try:
                job.env = job.r.venvs.prepare(reqs.lines, python, job.supervision(False),
                                              build_as=build_as, progress=progress)
            finally:
                if job.status.data.get("step") is not None:
                    job.status.update(step=None)
            log.info("%s: venv %s %s", job.req.key, job.env.key,
                     "reused" if job.env.reused else "built")
            if not job.env.reused:
                execute.kill_job_leftovers(job.r.cgroup_slot)  # what a setup.py left running
                job.r.launcher.fresh_leaf = False  # the build ran in the job leaf: the job gets a new one
    except pyenv.BadRequirement as e:
        job.note(str(e))
        return execute.Result(execute.ENV_FAILED, None, str(e))
    except pyenv.EnvBuildFailed as e:
        job.note(str(e))
        return execute.Result(execute.ENV_FAILED, None,
                              f"building the Python environment failed: {e.summary}", detail=str(e)[-4000:])
    except pyenv.Interrupted:
        if job.r.stopping:
            return execute.Result(execute.INTERRUPTED, None, "runner stopping (drain)")
        if job.r.jobs.cancel_requested(job.req.key):
            return execute.Result(execute.CANCELLED, None, "cancelled (appliance cancel) while its environment was built")
        return execute.Result(execute.TIMED_OUT, None,
                              "lifetime exceeded while building the environment")
    except Exception as e:
        return execute.Result(execute.ENV_FAILED, None, f"environment: {e}")
    user = job.r.user
    if user is not None and not users.executable_by(job.env.python, user.uid, user.gid):
        return execute.Result(execute.ENV_FAILED, None,
                              f"the interpreter {job.env.python} cannot be run by the workload user "
                              f"{user.name} (a folder on its path is private, e.g. /root): set "
                              f"runner.python, or build venvs from a system interpreter such as "
                              f"/usr/bin/python3")
    return None

def argv(job) -> list[str]:
    fn = job.req.filename.strip()
    if fn.startswith("-m"):
        head = ["-m", fn[2:].strip()]
    else:
        head = [fn]
    return [job.env.python, *head, *job.req.args]

def workload_env(job) -> dict[str, str]:
    base = execute.base_env(job.r.environ)
    extra = {
        "STUDIOML_EXPERIMENT": job.req.key,
        "STUDIOML_ARTIFACT_MAPPING": str(job.dir / "artifacts.json"),
        "TMPDIR": str(job.dir / ".tmp"),
        "HOME": str(job.dir / ".home"),
    }
    if job.r.user is not None:
        extra["USER"] = extra["LOGNAME"] = job.r.user.name
    mapping = {n: str(job.dir / n) for n in job.req.artifacts}
    (job.dir / "artifacts.json").write_text(json.dumps(mapping))
    if job.env.bin_dir is not None:
        extra.update(job.env.env_vars())
        extra["PATH"] = f"{job.env.bin_dir}:{base.get('PATH', os.defpath)}"
    extra.update(job.r.gpus.env)  # the frameworks' own GPU memory knobs, MPS (runner/gpu.py)
    cpus = job.r.environ.get("APPLIANCE_SLOT_CPUS")
    if cpus:
        n = str(env_cpus(cpus))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            extra[var] = n
    return execute.workload_env(job.r.environ, job.req.env, extra)

def warm_next(job, env: dict) -> None:
    """The slot's next launcher warms up as this job's interpreter, with its environment
    (runner.warm_interpreter; venvs only: a system interpreter reads HOME at start-up)."""
    if job.s.warm_interpreter and job.env.bin_dir is not None:
        job.r.warm_with = (job.env.python, warm.startup_env(env), job.r.user_ids)
    else:
        job.r.warm_with = ()


def keep_warm_venv(job) -> None:
    """The job is over: its venv stays held while the next job's interpreter warms up in it; one
    no interpreter warms up in any more is let go."""
    r = job.r
    if r.warm_with and r.warm_with[0] == job.env.python:  # the next interpreter warms up in it
        if r.warm_venv is not None:
            r.warm_venv.release()
        r.warm_venv = job.env
        return
    job.env.release()
    if not r.warm_with and r.warm_venv is not None:  # nothing warms up in a venv any more
        r.warm_venv.release()
        r.warm_venv = None


def report(job, result: execute.Result) -> dict:
    """The per-job report: what the workload used, where it ran, and how it ended."""
    cpus = job.r.environ.get("APPLIANCE_SLOT_CPUS")
    out = {"class": classes.classify(result.outcome, result.exit_code, f"{result.reason}\n{result.detail}"),
           "slot": job.r.slot, "cpus": cpus or None,
           "gpus": job.r.environ.get("CUDA_VISIBLE_DEVICES") or None,
           "wall_seconds": round(time.time() - job.started, 3)}
    if result.usage:
        out.update(result.usage)
        out["wall_seconds"] = result.usage.get("wall_seconds")
    if job.gpu is not None:
        out["gpu_peak_memory_bytes"] = job.gpu.summary().get("peak_memory_bytes")
    return out


def gpu_check(job) -> Optional[str]:
    """The supervision tick's GPU look (every runner.gpu_watch_s): a reason to stop the job
    when it is over its slot's share; its memory and utilisation into `status`."""
    try:
        looked = job.gpu.next_look
        reason = job.gpu.look()
        if job.gpu.next_look != looked:
            job.status.update(gpu=job.gpu.summary())
        return reason
    except Exception:  # noqa: BLE001 - a watch failure must not take the job down
        log.exception("%s: GPU watch", job.req.key)
        return None

def gpu_end(job) -> None:
    """The workload ended: last look, then kill its GPU processes still alive."""
    if job.gpu is None:
        return
    try:
        job.gpu.look(force=True)
        killed = job.r.gpus.kill_job_processes()
    except Exception:  # noqa: BLE001
        log.exception("%s: GPU leftovers", job.req.key)
        return
    if killed:
        what = gpu.describe(killed)
        log.warning("%s: killed GPU processes the job left running: %s", job.req.key, what)
        job.note(f"killed GPU processes the job left running: {what}")


def unpack_limit(job) -> int:
    """The most the job's artifacts may unpack to, all of them together: runner.max_unpack,
    the request's hdd, and this slot's share of the work disk, whichever is smallest."""
    disk = shutil.disk_usage(job.dir)
    share = disk.total // max(1, len(slot_shapes(job.r.home)) or 1)
    limits = [job.s.max_unpack_bytes, share]
    if job.req.resources.hdd_bytes:
        limits.append(job.req.resources.hdd_bytes)
    return min(limits)
