"""What the appliance costs while it waits: idle CPU and memory of each of its processes, fresh
and after many experiments, in one run. Needs root (slots make cgroups).

    sudo .venv/bin/python bench/bench_resources.py [--experiments 1000] [--seconds 60]

It brings up a throwaway appliance (real supervisord, SeaweedFS, cgroups; one slot per CPU),
lets it settle, then samples every process's CPU time (utime + stime from /proc/PID/stat)
over --seconds and its RSS: supervisord, the controller, each runner (and its job launcher),
the store (`weed`, and the forwarder in front of it). Then it runs --experiments trivial
experiments through the local queue (each: fetch the workspace, list and read the
experiment's folder, run, upload output and result record: what every job costs the store),
lets it settle again and samples once more. Last, one 64 MiB object is put and got through
the store's S3 endpoint (MiB/s), so a change that makes the store rest can show it costs no
throughput. Each figure is printed next to its goal:
    supervisord + controller <= 60 MB RSS; idle runner <= 25 MB RSS;
    store idle <= 0.5 % of a core and <= 200 MB RSS; whole idle appliance <= 0.5 % of a core.
`--keep` leaves the appliance running and prints its home (for strace, perf, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.actions.submit import build_request  # noqa: E402
from appliance.paths import Home  # noqa: E402
from appliance.queues.local import enqueue  # noqa: E402
from appliance.store.client import s3_client  # noqa: E402
from appliance.store.credentials import load_credentials  # noqa: E402
from appliance.workspace import pack_directory, workspace_key  # noqa: E402
from tests.cgroup_fixtures import remove_cgroup_parent  # noqa: E402
from tests.store_fixtures import free_store_port  # noqa: E402

QUEUE = "local_bench"
TRIVIAL = "import sys, time\nopen(sys.argv[1], 'a').write(f'{sys.argv[2]} {time.time()}\\n')\n"
MB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")

GOALS = {  # what the issue asks of an idle appliance
    "supervisord + controller RSS": 60,
    "runner RSS": 25,
    "store RSS": 200,
    "store CPU": 0.5,
    "appliance CPU": 0.5,
}


def cli(home: Path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "appliance", "--home", str(home), *args],
                          check=True, capture_output=True, text=True, env=env)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


@dataclass
class Proc:
    role: str  # supervisord, controller, runner, launcher, store, forwarder
    name: str
    pid: int


def appliance_processes(home: Home) -> list[Proc]:
    """Every long-lived process of the appliance, by role."""
    from appliance import supervisor

    procs = [Proc("supervisord", "supervisord", supervisor.supervisord_pid(home))]
    for name, info in sorted(supervisor.processes(home).items()):
        if not info.pid:
            continue
        if name == "store":
            procs.append(Proc("forwarder", "store forwarder", info.pid))
            procs += [Proc("store", "store (weed)", c) for c in children(info.pid)]
        elif name == "controller":
            procs.append(Proc("controller", name, info.pid))
        else:
            procs.append(Proc("runner", name, info.pid))
            procs += [Proc("launcher", f"{name} launcher", c) for c in children(info.pid)]
    return procs


@dataclass
class Sample:
    proc: Proc
    cpu_pct: float  # of one core, over the window
    rss: int


def sample(home: Home, seconds: float) -> list[Sample]:
    """CPU of each process over `seconds`, and its RSS at the end."""
    procs = appliance_processes(home)
    t0, before = time.monotonic(), {p.pid: cpu_ticks(p.pid) for p in procs}
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    out = []
    for p in procs:
        try:
            used = cpu_ticks(p.pid) - before[p.pid]
            out.append(Sample(p, used / TICK / elapsed * 100, rss_bytes(p.pid)))
        except OSError:
            print(f"  ({p.name}, pid {p.pid}, ended during the sample)")
    return out


def verdict(value: float, goal: float) -> str:
    return "ok" if value <= goal else "OVER"


def report(title: str, samples: list[Sample], seconds: float) -> dict:
    print(f"\n{title} (CPU over {seconds:g} s, % of one core; RSS now):")
    for s in samples:
        print(f"  {s.proc.name:24} pid {s.proc.pid:>7}  CPU {s.cpu_pct:6.2f} %   RSS {s.rss / MB:6.1f} MB")

    def total(roles, what):
        return sum(getattr(s, what) for s in samples if s.proc.role in roles)

    figures = {
        "supervisord + controller RSS": total(("supervisord", "controller"), "rss") / MB,
        "runner RSS": max((s.rss / MB for s in samples if s.proc.role == "runner"), default=0),
        "runner + launcher RSS": max((total(("runner", "launcher"), "rss") / MB
                                      / max(1, sum(s.proc.role == "runner" for s in samples))), 0),
        "store RSS": total(("store",), "rss") / MB,
        "store CPU": total(("store",), "cpu_pct"),
        "appliance CPU": sum(s.cpu_pct for s in samples),
        "appliance RSS": sum(s.rss for s in samples) / MB,
    }
    for name, value in figures.items():
        unit = "%" if "CPU" in name else "MB"
        goal = GOALS.get(name)
        aim = f"  (goal <= {goal:g} {unit}: {verdict(value, goal)})" if goal is not None else ""
        print(f"  {name:30} {value:8.2f} {unit}{aim}")
    return figures


class Bench:
    def __init__(self, base: Path, slots: int | None):
        self.base = base
        self.home_dir = base / "home"
        self.home = Home.at(self.home_dir)
        self.starts = base / "starts.log"
        self.env = {**os.environ, "APPLIANCE_CGROUP_PARENT": f"appliance-bench-{uuid.uuid4().hex[:6]}",
                    "MC_CONFIG_DIR": str(base / "mc")}
        self.slots_wanted = slots

    def up(self):
        # workloads run as unprivileged slot accounts: they must reach the home and note their start
        self.base.chmod(0o755)
        self.starts.touch(mode=0o666)
        self.starts.chmod(0o666)
        self.home_dir.mkdir(parents=True)
        slots = f"count = {self.slots_wanted}\n" if self.slots_wanted else ""
        self.home.config_file.write_text(
            "[host]\nreserved_cpus = 0\nreserved_memory = \"1GiB\"\n"
            f"[slots.cpu]\n{slots}memory = \"1GiB\"\nshm = \"64MiB\"\n"
            f"[object_store]\nport = {free_store_port()}\n[runner]\ndrain_timeout = \"10s\"\n")
        cli(self.home_dir, "up", env=self.env)
        port = self.home.config_file.read_text().split("port = ")[1].split()[0]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.creds = load_credentials(self.home)
        ws = self.base / "ws"
        ws.mkdir()
        (ws / "trivial.py").write_text(TRIVIAL)
        tar, sha = pack_directory(ws, out_dir=self.base)
        self.ws_key = workspace_key(sha)
        self.client().upload_file(str(tar), "appliance", self.ws_key)

    def client(self):
        return s3_client(self.endpoint, self.creds.access_key, self.creds.secret_key)

    def down(self):
        cli(self.home_dir, "down", env=self.env)
        remove_cgroup_parent(self.env["APPLIANCE_CGROUP_PARENT"])

    def request(self, key: str) -> bytes:
        body = build_request(
            key=key, script="trivial.py", script_args=[str(self.starts), key], workspace_key=self.ws_key,
            workspace_dir=str(self.base / "ws"), endpoint=self.endpoint, bucket="appliance",
            access_key=self.creds.access_key, secret_key=self.creds.secret_key, region="us-east-1",
            resources={"cpus": 1, "gpus": 0, "ram": "256mb", "hdd": "1gb", "gpuMem": "0gb"},
            max_duration=None, lifetime=None, save_every="3m", env={}, pip=[], pythonenv=[],
            pythonver="3.11", studioml_home=self.home.studioml_home, now=time.time())
        return json.dumps(body).encode()

    def started(self) -> set:
        if not self.starts.exists():
            return set()
        return {line.split()[0] for line in self.starts.read_text().splitlines() if line.strip()}

    def queue_empty(self) -> bool:
        root = self.home.queue_root
        waiting = list((root / QUEUE).glob("*")) if (root / QUEUE).is_dir() else []
        claimed = list((root / ".claimed" / QUEUE).glob("*")) if (root / ".claimed" / QUEUE).is_dir() else []
        return not [p for p in waiting if p.name != "lock.lock"] and not claimed

    def run_experiments(self, n: int, batch: int = 200) -> float:
        """n experiments, queued `batch` at a time; seconds until all ran and were settled."""
        t0 = time.time()
        done = 0
        while done < n:
            keys = [f"bench-{uuid.uuid4().hex[:10]}" for _ in range(min(batch, n - done))]
            for key in keys:
                enqueue(self.home.queue_root, QUEUE, self.request(key))
            while True:
                started = self.started()
                if all(k in started for k in keys) and self.queue_empty():
                    break
                time.sleep(0.1)
            done += len(keys)
            print(f"  {done}/{n} experiments done ({time.time() - t0:.0f} s)", flush=True)
        return time.time() - t0

    def throughput(self, mib: int = 64) -> tuple[float, float]:
        """MiB/s of one `mib` MiB put and get through the store's S3 endpoint."""
        c = self.client()
        data = os.urandom(mib * MB)
        t = time.monotonic()
        c.put_object(Bucket="appliance", Key="bench/big", Body=data)
        put = mib / (time.monotonic() - t)
        t = time.monotonic()
        got = c.get_object(Bucket="appliance", Key="bench/big")["Body"].read()
        get = mib / (time.monotonic() - t)
        assert got == data, "the store gave back other bytes"
        c.delete_object(Bucket="appliance", Key="bench/big")
        return put, get


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", type=int, default=1000, help="experiments between the two samples")
    ap.add_argument("--seconds", type=float, default=60, help="length of each idle CPU sample")
    ap.add_argument("--settle", type=float, default=15, help="seconds to wait before each sample")
    ap.add_argument("--slots", type=int, default=None, help="CPU slots (default: one per CPU)")
    ap.add_argument("--keep", action="store_true", help="leave the appliance running at the end")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_resources: run as root (slots create cgroups)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="appliance-bench-res-"))
    bench = Bench(base, args.slots)
    bench.up()
    try:
        time.sleep(args.settle)
        fresh = report("fresh appliance, idle", sample(bench.home, args.seconds), args.seconds)
        print(f"\nrunning {args.experiments} trivial experiments ...", flush=True)
        took = bench.run_experiments(args.experiments)
        print(f"  {args.experiments / took:.1f} experiments/s")
        time.sleep(args.settle)
        after = report(f"after {args.experiments} experiments, idle", sample(bench.home, args.seconds),
                       args.seconds)
        put, get = bench.throughput()
        print(f"\nstore throughput, one 64 MiB object through S3: PUT {put:.0f} MiB/s, GET {get:.0f} MiB/s")
        print("\nfresh -> after:")
        for name in fresh:
            unit = "%" if "CPU" in name else "MB"
            print(f"  {name:30} {fresh[name]:8.2f} -> {after[name]:8.2f} {unit}")
    finally:
        if args.keep:
            print(f"\nkept running: appliance --home {bench.home_dir} "
                  f"(APPLIANCE_CGROUP_PARENT={bench.env['APPLIANCE_CGROUP_PARENT']}); stop with `appliance down`")
        else:
            bench.down()
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
