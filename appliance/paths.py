"""Where things live inside an appliance home.

Every other module asks a `Home` for paths instead of joining strings itself, so the
layout is written down once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT_HOME = Path("/var/lib/appliance")
# Members of this group may submit and read results without sudo (install.sh creates it).
SHARED_GROUP = "appliance"


def default_home() -> Path:
    """`--home` beats `APPLIANCE_HOME`, which beats the per-user or system default."""
    env = os.environ.get("APPLIANCE_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return ROOT_HOME
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "appliance"


def shared_gid(group: str = SHARED_GROUP) -> int | None:
    """The id of the group that shares the queue and the results; None when it does not exist."""
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


class HomeError(ValueError):
    pass


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike | None = None) -> "Home":
        root = Path(path).expanduser().resolve() if path else default_home().resolve()
        if "%" in str(root):
            # supervisord expands '%' in its log paths (twice), so such a home cannot work
            raise HomeError(f"the appliance home {root} contains '%': choose a path without it (--home DIR)")
        return cls(root)

    @property
    def config_file(self) -> Path:
        return self.root / "appliance.toml"

    # secrets: generated store credentials, mode 0600
    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def store_credentials(self) -> Path:
        return self.secrets_dir / "store.json"

    @property
    def store_identities(self) -> Path:
        """SeaweedFS's `-s3.config` file (identities)."""
        return self.secrets_dir / "s3.json"

    # rendered files and sockets of the running appliance
    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def supervisord_conf(self) -> Path:
        return self.run_dir / "supervisord.conf"

    @property
    def supervisor_socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def supervisord_pid(self) -> Path:
        return self.run_dir / "supervisord.pid"

    @property
    def plan_file(self) -> Path:
        """The plan currently applied (JSON), so a re-plan can stay stable."""
        return self.run_dir / "plan.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def store_data(self) -> Path:
        return self.root / "store"

    @property
    def studioml_home(self) -> Path:
        """What users set STUDIOML_HOME to; the local queue root is its `queue/` folder."""
        return self.root / "studioml"

    @property
    def queue_root(self) -> Path:
        return self.studioml_home / "queue"

    @property
    def credentials_dir(self) -> Path:
        """One entry per queue source (RabbitMQ URL files, SQS credential folders)."""
        return self.root / "credentials"

    @property
    def status_dir(self) -> Path:
        """One small JSON status file per runner."""
        return self.root / "status"

    def slot_status(self, slot: str) -> Path:
        return self.status_dir / f"{slot}.json"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def artifact_cache(self) -> Path:
        return self.cache_dir / "artifacts"

    @property
    def venv_cache(self) -> Path:
        return self.cache_dir / "venvs"

    @property
    def uv_cache(self) -> Path:
        """The uv cache every venv build shares (root's, 0700; on the venvs' filesystem)."""
        return self.cache_dir / "uv"

    @property
    def work_dir(self) -> Path:
        """Per-slot scratch space where experiments are unpacked and run."""
        return self.root / "work"

    @property
    def jobs_dir(self) -> Path:
        """The job table's folder (jobs/table.py: jobs.db and SQLite's -wal and -shm beside it),
        root's alone; a folder so that a slot's container can mount it whole."""
        return self.root / "jobs"

    @property
    def ledger_dir(self) -> Path:
        """This box's exactly-once records (runner/ledger_stores.py), root's alone."""
        return self.root / "ledger"

    @property
    def appliance_id_file(self) -> Path:
        """This appliance's id among the appliances sharing a queue (appliance/identity.py)."""
        return self.root / "appliance-id"

    @property
    def refusals_dir(self) -> Path:
        """What each runner refused on shared queues, one JSON file per slot (`queue ls`)."""
        return self.status_dir / "refusals"

    @property
    def events_file(self) -> Path:
        """Controller's re-plan log (JSON lines)."""
        return self.root / "events.jsonl"

    def ensure(self) -> None:
        for d in (self.root, self.run_dir, self.logs_dir, self.store_data, self.queue_root,
                  self.credentials_dir, self.status_dir, self.cache_dir, self.work_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        self.artifact_cache.mkdir(parents=True, exist_ok=True)
        # workloads run as other users: keys, broker passwords, logs, the slots' status (every
        # running job's key and owner) and other tenants' cached workspaces are the appliance's
        # alone (members read status through the API); venvs and job folders stay reachable
        # (0711 or sealed read-only), each job's own content is its workload's
        for d in (self.jobs_dir, self.ledger_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        for d in (self.secrets_dir, self.credentials_dir, self.logs_dir, self.status_dir, self.artifact_cache,
                  self.jobs_dir, self.ledger_dir):
            os.chmod(d, 0o700)
