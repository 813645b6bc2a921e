"""The runner's settings: what it takes from the config (`[runner]` of appliance.toml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.queues import refusals
from appliance.studioml.transfer import RetryPolicy

GiB = 1024 ** 3


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
    idle_wait_s: float = 30.0  # idle, with nothing arriving: look at the queues again (orphans, retries)
    tick_s: float = 1.0
    store_backoff_s: float = 5.0  # first pause after the store was down; doubles
    store_backoff_max_s: float = 300.0
    store_wait_s: float = 1800.0  # a finished job's uploads are retried this long, holding its message
    resume_every_s: float = 30.0  # how often finished jobs whose uploads failed are tried again
    workload_user: str = "auto"  # isolation.user (see appliance/slot/users.py)
    max_attempts: int = 3  # claims of one message before it is quarantined (dead letter)
    max_interruptions: int = 10  # runs of one job killed from outside before it is dead-lettered
    own_store: str = ""  # this appliance's store endpoint: its outage holds requests uncounted
    retries: int = 2  # runs again after an infrastructure failure (runner/classes.py)
    retry_backoff_s: float = 5.0  # held this long before such a run again; doubles per retry
    retry_backoff_max_s: float = 120.0
    hang_after_s: float = 0.0  # no CPU progress and no output this long: stopped as hung (0: never)
    warm_interpreter: bool = True  # runner.warm_interpreter: the next job's Python started ahead (warm.py)
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
                   max_attempts=r.max_attempts, max_interruptions=r.max_interruptions,
                   own_store=_own_store(config), retries=r.retries, hang_after_s=r.hang_after,
                   gpu_share=config.isolation.gpu_share,
                   unrunnable_after_refusals=config.queues.unrunnable_after_refusals,
                   unrunnable_after_s=config.queues.unrunnable_after,
                   installer=r.installer, env_cache_bytes=r.env_cache, warm_interpreter=r.warm_interpreter)


def _own_store(config) -> str:
    from appliance.store.server import StoreError, endpoint_url
    try:
        return endpoint_url(config)
    except StoreError:
        return ""
