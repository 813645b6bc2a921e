"""The docker backend of a slot: one container per slot, run in the foreground.

supervisord runs, per slot,

    python -m appliance.slot.docker_slot --slot slot-0 --cpus 0-1 --memory-bytes N \\
        --shm-bytes N [--pids-limit N] [--gpus UUID,.. [--gpu-memory-bytes N]] --image IMAGE --home HOME \\
        [--env K=V ...] [--stop-timeout S] [--workload-user U] -- python -m appliance.runner --home HOME --slot slot-0

which replaces any stale container of that slot, starts container `appliance-<slot>` with the
slot's cpuset, memory (swap included), /dev/shm size, pids bound and GPUs, streams its output
to ours, turns SIGTERM/SIGINT into `docker stop`, waits, removes the container and exits with
its exit code. So supervisord sees one foreground process per slot, exactly as with the process backend.

Containers carry the labels `appliance.home` and `appliance.slot`, so `list_slot_containers`
and `remove_stale` find them from `status`, `up` and `down` even after a crash.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from appliance.slot.cgroup.base import RUNNER_PIDS

HOME_LABEL = "appliance.home"
SLOT_LABEL = "appliance.slot"
DEFAULT_STOP_TIMEOUT = 10
EXIT_SETUP_FAILED = 2

DOCKER_FIX = ("install docker (apt-get install docker.io) and start dockerd "
              "(systemctl start docker, or: dockerd &)")
NVIDIA_FIX = ("install the NVIDIA Container Toolkit (nvidia-container-toolkit), run "
              "`nvidia-ctk runtime configure --runtime=docker` and restart dockerd")
IMAGE_FIX = ("build it with: appliance image build --tag {image} "
             "(or python -m appliance.image --tag {image})")


class SlotError(Exception):
    """A problem with a clear cause and fix: printed as one line, exit 2, no traceback."""


def container_name(home: str | os.PathLike, slot: str) -> str:
    """`appliance-<hash of the home>-<slot>`: two appliances on one host never share a name, so
    one home's `up` never replaces the other's container (the same id as its cgroup parent)."""
    from appliance.slot.cgroup import home_parent  # noqa: PLC0415
    return f"{home_parent(str(home))}-{slot}"


def _home_label(home: str | os.PathLike) -> str:
    return str(Path(home).expanduser().resolve())


def _client():
    """A docker client that has answered a ping, or SlotError saying how to fix it."""
    try:
        import docker  # noqa: PLC0415  (the SDK is only needed by the docker backend)
    except ImportError:
        raise SlotError("the docker Python SDK is missing: pip install 'docker>=7'") from None
    try:
        client = docker.from_env()
        client.ping()
        return client
    except docker.errors.DockerException as e:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise SlotError(f"cannot reach dockerd at {where} ({_short(e)}): {DOCKER_FIX}") from None


def _short(error: Exception) -> str:
    """One line of an SDK error, without the request URL noise."""
    explanation = getattr(error, "explanation", None)
    text = str(explanation or error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _has_nvidia(client) -> bool:
    """dockerd can serve GPU device requests: an `nvidia` runtime, or the NVIDIA hook on PATH
    (dockerd registers its `nvidia` device driver when it finds that hook)."""
    import shutil  # noqa: PLC0415
    runtimes = client.info().get("Runtimes") or {}
    return "nvidia" in runtimes or shutil.which("nvidia-container-runtime-hook") is not None


def docker_problems(gpus_needed: bool = False, image: str | None = None) -> list[str]:
    """What stops the docker backend from working here, each with its fix; empty when usable."""
    try:
        client = _client()
    except SlotError as e:
        return [str(e)]
    problems = []
    if gpus_needed and not _has_nvidia(client):
        problems.append(f"dockerd cannot give containers GPUs (no NVIDIA runtime): {NVIDIA_FIX}")
    if image:
        import docker  # noqa: PLC0415
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            problems.append(f"the runner image {image} does not exist: "
                            + IMAGE_FIX.format(image=image))
    return problems


def list_slot_containers(home: str | os.PathLike, client=None) -> list[dict]:
    """The slot containers of this appliance home, in any state."""
    client = client or _client()
    found = client.containers.list(all=True, filters={"label": f"{HOME_LABEL}={_home_label(home)}"})
    return sorted(({"name": c.name, "id": c.id, "slot": c.labels.get(SLOT_LABEL, ""),
                    "status": c.status} for c in found), key=lambda c: c["name"])


# Where a container's memory cgroup is on the host: v1 and v2, cgroupfs and systemd drivers.
_MEMORY_USAGE_FILES = (
    "/sys/fs/cgroup/memory/docker/{id}/memory.usage_in_bytes",
    "/sys/fs/cgroup/memory/system.slice/docker-{id}.scope/memory.usage_in_bytes",
    "/sys/fs/cgroup/docker/{id}/memory.current",
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.current",
)


def container_memory_usage(container_id: str, client=None) -> int | None:
    """Bytes charged to the container's memory cgroup (its runner, workload and /dev/shm
    pages): read from the host's cgroup files, else one `docker stats` sample; None if unknown."""
    for pattern in _MEMORY_USAGE_FILES:
        try:
            with open(pattern.format(id=container_id)) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    try:
        client = client or _client()
        stats = client.api.stats(container_id, stream=False, one_shot=True)
        usage = (stats.get("memory_stats") or {}).get("usage")
        return int(usage) if usage is not None else None
    except Exception:  # noqa: BLE001  (daemon gone, container gone: unknown)
        return None


def remove_stale(home: str | os.PathLike, client=None) -> list[str]:
    """Force-remove every slot container of this home; return their names."""
    import docker  # noqa: PLC0415
    client = client or _client()
    removed = []
    for c in list_slot_containers(home, client):
        try:
            client.containers.get(c["id"]).remove(force=True)
            removed.append(c["name"])
        except docker.errors.NotFound:
            pass  # gone already (its docker_slot removed it)
    return removed


def _remove_by_name(client, name: str) -> None:
    import docker  # noqa: PLC0415
    try:
        client.containers.get(name).remove(force=True)
    except docker.errors.NotFound:
        pass


def _environment(args) -> dict[str, str]:
    env = {}
    for pair in args.env:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SlotError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    env.update(CUDA_VISIBLE_DEVICES=",".join(args.gpus), CUDA_DEVICE_ORDER="PCI_BUS_ID",
               APPLIANCE_GPU_MEMORY_BYTES=str(args.gpu_memory_bytes),
               APPLIANCE_SLOT=args.slot, APPLIANCE_WORKLOAD_USER=_workload_ids(args),
               APPLIANCE_SLOT_MEMORY_BYTES=str(args.memory_bytes),
               APPLIANCE_SLOT_SHM_BYTES=str(args.shm_bytes),  # the runner empties /dev/shm after each job
               APPLIANCE_ISOLATION="docker")
    return env


def _workload_ids(args) -> str:
    """The workload account, made and looked up on the host: "uid:gid" (the image has no such
    account), or "root"."""
    from appliance.slot.users import UserError, workload_user
    try:
        user = workload_user(args.workload_user, args.slot)
    except UserError as e:
        raise SlotError(str(e)) from None
    return f"{user.uid}:{user.gid}" if user else "root"


def _command(command: list[str]) -> list[str]:
    """The host's interpreter path means nothing in the image: run the image's `python`."""
    if command and os.path.realpath(command[0]) == os.path.realpath(sys.executable):
        return ["python", *command[1:]]
    return command


def _start_failure(error: Exception, args) -> str:
    text = _short(error)
    if args.gpus and ("nvidia" in text or "device driver" in text):
        return f"cannot give the container GPUs {','.join(args.gpus)} ({text}): {NVIDIA_FIX}"
    return f"cannot start the container ({text})"


def slot_mounts(home: str, slot: str) -> dict:
    """What a slot's runner needs of the home, and nothing else: never `secrets/` (the store's
    admin keys), the store's data, supervisord's socket or logs, or another slot's work dir.
    The job table and the ledger are the box's, shared with every slot and the API: without
    them a job in a container never showed as running or done, could not be cancelled, and
    its exactly-once record went with the container."""
    from appliance.paths import Home
    h = Home(Path(home))
    private = [h.jobs_dir, h.ledger_dir]  # root's alone, as on the host
    rw = [h.queue_root, h.status_dir, h.cache_dir, h.work_dir / slot, h.run_dir / "serving"] + private
    ro = [h.config_file, h.plan_file, h.credentials_dir, h.run_dir / "sources.json",
          h.appliance_id_file]  # `up` made it: the box's id, whatever host name a container has
    for d in private:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    for d in rw:
        d.mkdir(parents=True, exist_ok=True)
    mounts = {str(p): {"bind": str(p), "mode": "rw"} for p in rw}
    mounts.update({str(p): {"bind": str(p), "mode": "ro"} for p in ro if p.exists()})
    return mounts


def create_container(client, args):
    """Create (not start) the slot's container, replacing a stale one of the same name."""
    import docker  # noqa: PLC0415
    name = container_name(args.home, args.slot)
    _remove_by_name(client, name)
    home = _home_label(args.home)
    device_requests = []
    if args.gpus:
        device_requests = [docker.types.DeviceRequest(device_ids=list(args.gpus),
                                                      capabilities=[["gpu"]])]
    try:
        return client.containers.create(
            args.image, _command(args.command), name=name,
            labels={HOME_LABEL: home, SLOT_LABEL: args.slot},
            cpuset_cpus=args.cpus, mem_limit=args.memory_bytes,
            memswap_limit=args.memory_bytes, shm_size=args.shm_bytes,
            pids_limit=(args.pids_limit + RUNNER_PIDS) if args.pids_limit else None,
            init=True, network_mode="host", environment=_environment(args),
            volumes=slot_mounts(home, args.slot), device_requests=device_requests,
            stop_signal="SIGTERM")
    except docker.errors.ImageNotFound:
        raise SlotError(f"the runner image {args.image} does not exist: "
                        + IMAGE_FIX.format(image=args.image)) from None
    except docker.errors.APIError as e:
        raise SlotError(f"cannot create the container ({_short(e)})") from None


class Foreground:
    """Run a created container like a child process: output, signals, exit code."""

    def __init__(self, stop_timeout: int):
        self.container = None
        self.started = False
        self.stop_timeout = stop_timeout
        self.signals = 0

    def on_signal(self, signum, _frame) -> None:
        """SIGTERM/SIGINT. Before the container runs, it only keeps us from starting it."""
        self.signals += 1
        if self.started:
            self._stop()

    def _stop(self) -> None:
        """First signal: `docker stop` (SIGTERM, then SIGKILL after the timeout); a second
        one: kill now. In a thread, so the main thread stays in `wait`."""
        if self.signals == 1:
            action, kwargs = self.container.stop, {"timeout": self.stop_timeout}
        else:
            action, kwargs = self.container.kill, {}
        threading.Thread(target=self._quietly, args=(action, kwargs), daemon=True).start()

    @staticmethod
    def _quietly(action, kwargs) -> None:
        try:
            action(**kwargs)
        except Exception:  # noqa: BLE001  (already stopped or removed: nothing to do)
            pass

    def run(self, container, describe_failure) -> int:
        """Start `container`, copy its output, wait for it; its exit code."""
        import docker  # noqa: PLC0415
        self.container = container
        if self.signals:  # told to stop before we started
            return 128 + signal.SIGTERM
        stream = container.attach(stdout=True, stderr=True, stream=True, logs=True, demux=True)
        try:
            container.start()
        except docker.errors.APIError as e:
            raise SlotError(describe_failure(e)) from None
        self.started = True
        if self.signals:  # a signal came while we were starting
            self._stop()
        pump = threading.Thread(target=_pump, args=(stream,), daemon=True)
        pump.start()
        status = self.container.wait()
        pump.join(timeout=5)
        return int(status.get("StatusCode", 1))


def _pump(stream) -> None:
    """Copy the container's stdout and stderr to ours as they come."""
    try:
        for out, err in stream:
            for data, dest in ((out, sys.stdout.buffer), (err, sys.stderr.buffer)):
                if data:
                    dest.write(data)
                    dest.flush()
    except Exception:  # noqa: BLE001  (the stream ends with the container)
        pass


def run_slot(args) -> int:
    import docker  # noqa: PLC0415
    foreground = Foreground(args.stop_timeout)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, foreground.on_signal)
    client = _client()
    container = create_container(client, args)
    try:
        code = foreground.run(container, lambda e: _start_failure(e, args))
        container.reload()
        for _ in range(10 if code == 137 else 0):  # dockerd may note the OOM kill a moment after the exit
            if container.attrs["State"].get("OOMKilled"):
                break
            time.sleep(0.2)
            container.reload()
        if code == 137 and container.attrs["State"].get("OOMKilled"):  # not just a workload
            print(f"{container.name}: the container was OOM-killed (memory limit "
                  f"{args.memory_bytes} bytes)", file=sys.stderr, flush=True)
        return code
    except docker.errors.NotFound:
        raise SlotError("the container was removed from outside (appliance down?)") from None
    finally:
        try:
            container.remove(force=True)
        except docker.errors.APIError:
            pass


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m appliance.slot.docker_slot",
                                description="Run one slot's runner in its own container.")
    p.add_argument("--slot", required=True, help="slot name, e.g. slot-0")
    p.add_argument("--cpus", required=True, help="cpuset, e.g. 0-1 or 2,3")
    p.add_argument("--memory-bytes", type=int, required=True, help="memory limit, swap included")
    p.add_argument("--shm-bytes", type=int, required=True, help="size of /dev/shm")
    p.add_argument("--pids-limit", type=int, default=0,
                   help="processes and threads a job may have (the container gets some more for its runner)")
    p.add_argument("--gpus", type=lambda s: [g for g in s.split(",") if g], default=[],
                   help="GPU UUIDs (GPU-... or MIG-...), comma-separated")
    p.add_argument("--gpu-memory-bytes", type=int, default=0,
                   help="GPU memory the slot may use on each of its GPUs (APPLIANCE_GPU_MEMORY_BYTES)")
    p.add_argument("--image", required=True, help="runner image (python -m appliance.image)")
    p.add_argument("--home", required=True, help="appliance home, bind-mounted at the same path")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workload-user", default="auto",
                   help="isolation.user: who workloads run as (the runner is root in its container)")
    p.add_argument("--stop-timeout", type=int, default=DEFAULT_STOP_TIMEOUT,
                   help="seconds between SIGTERM and SIGKILL when stopping (the drain bound)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the runner command")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        p.error("no command given after --")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_slot(args)
    except SlotError as e:
        print(f"{container_name(args.home, args.slot)}: {e}", file=sys.stderr, flush=True)
        return EXIT_SETUP_FAILED


if __name__ == "__main__":
    sys.exit(main())
