"""Runner throughput and start latency, next to GNU parallel on the same workload, in one run.

    sudo .venv/bin/python bench/bench_runner.py [--jobs 200] [--latency-samples 30]

It brings up a throwaway appliance (real supervisord, SeaweedFS, cgroups; one slot per CPU),
then measures:
  1. N trivial experiments queued at once: experiments/second end to end, and the median and
     p99 enqueue-to-start latency; GNU parallel runs the same script as many times on as many
     processes (-j SLOTS) as the baseline.
  2. enqueue-to-start latency of one experiment at a time on idle slots (median, p99).
  3. the first experiment with a given pythonenv (builds a virtualenv) against a second one
     with the same pythonenv (reuses it): the ratio of their enqueue-to-start times.
  4. as many experiments as slots, all with that pythonenv and each sleeping --sleep seconds,
     queued at once on idle slots: the ideal time (one sleep) over the time until the last
     one ended (1.0: they all used the venv at once; 1/N: one after the other).
     `--shared-env-only` runs just this case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
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
# TRIVIAL, then sleep argv[3] seconds and note the end in argv[4]
SLEEPER = TRIVIAL + "time.sleep(float(sys.argv[3]))\nopen(sys.argv[4], 'a').write(f'{sys.argv[2]} {time.time()}\\n')\n"


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def cli(home: Path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "appliance", "--home", str(home), *args],
                          check=True, capture_output=True, text=True, env=env)


class Bench:
    def __init__(self, base: Path):
        self.base = base
        self.home_dir = base / "home"
        self.home = Home.at(self.home_dir)
        self.starts = base / "starts.log"
        self.ends = base / "ends.log"
        # Workloads run as the slots' own unprivileged accounts: they must reach and append to
        # these logs (the folder stays unlistable to them).
        base.chmod(0o711)
        for log in (self.starts, self.ends):
            log.touch()
            log.chmod(0o666)
        self.env = {**os.environ, "APPLIANCE_CGROUP_PARENT": f"appliance-bench-{uuid.uuid4().hex[:6]}",
                    "MC_CONFIG_DIR": str(base / "mc")}

    def up(self):
        self.home_dir.mkdir(parents=True)
        self.home.config_file.write_text(
            "[host]\nreserved_cpus = 0\nreserved_memory = \"1GiB\"\n"
            "[slots.cpu]\nmemory = \"1GiB\"\nshm = \"64MiB\"\n"
            f"[object_store]\nport = {free_store_port()}\n[runner]\ndrain_timeout = \"10s\"\n")
        cli(self.home_dir, "up", env=self.env)
        self.slots = len(json.loads(cli(self.home_dir, "status", "--json", env=self.env).stdout)["slots"])
        port = self.home.config_file.read_text().split("port = ")[1].split()[0]
        self.endpoint = f"http://127.0.0.1:{port}"
        creds = load_credentials(self.home)
        self.creds = creds
        ws = self.base / "ws"
        ws.mkdir()
        (ws / "trivial.py").write_text(TRIVIAL)
        (ws / "sleeper.py").write_text(SLEEPER)
        tar, sha = pack_directory(ws, out_dir=self.base)
        self.ws_key = workspace_key(sha)
        s3_client(self.endpoint, creds.access_key, creds.secret_key).upload_file(str(tar), "appliance", self.ws_key)

    def down(self):
        cli(self.home_dir, "down", env=self.env)
        remove_cgroup_parent(self.env["APPLIANCE_CGROUP_PARENT"])

    def request(self, key: str, pythonenv=(), sleep_s=None) -> bytes:
        script, args = "trivial.py", [str(self.starts), key]
        if sleep_s is not None:
            script, args = "sleeper.py", args + [str(sleep_s), str(self.ends)]
        body = build_request(
            key=key, script=script, script_args=args, workspace_key=self.ws_key,
            workspace_dir=str(self.base / "ws"), endpoint=self.endpoint, bucket="appliance",
            access_key=self.creds.access_key, secret_key=self.creds.secret_key, region="us-east-1",
            resources={"cpus": 1, "gpus": 0, "ram": "256mb", "hdd": "1gb", "gpuMem": "0gb"},
            max_duration=None, lifetime=None, save_every="3m", env={}, pip=[], pythonenv=list(pythonenv),
            pythonver="3.11", studioml_home=self.home.studioml_home, now=time.time())
        return json.dumps(body).encode()

    def started(self, log=None) -> dict[str, float]:
        log = log or self.starts
        if not log.exists():
            return {}
        out = {}
        for line in log.read_text().splitlines():
            key, ts = line.split()
            out[key] = float(ts)
        return out

    def queue_empty(self) -> bool:
        root = self.home.queue_root
        waiting = list((root / QUEUE).glob("*")) if (root / QUEUE).is_dir() else []
        claimed = list((root / ".claimed" / QUEUE).glob("*")) if (root / ".claimed" / QUEUE).is_dir() else []
        return not [p for p in waiting if p.name != "lock.lock"] and not claimed

    def run_batch(self, n: int, pythonenv=()) -> tuple[float, list[float]]:
        """Queue n experiments at once; (seconds until all are done, enqueue-to-start latencies)."""
        keys = [f"bench-{uuid.uuid4().hex[:10]}" for _ in range(n)]
        bodies = [self.request(k, pythonenv) for k in keys]
        enqueued = {}
        t0 = time.time()
        for key, body in zip(keys, bodies):
            enqueued[key] = time.time()
            enqueue(self.home.queue_root, QUEUE, body)
        while True:
            started = self.started()
            if all(k in started for k in keys) and self.queue_empty():
                break
            self.give_up_after(t0, f"{n - len(started.keys() & set(keys))} of {n} experiments never started")
            time.sleep(0.01)
        elapsed = time.time() - t0
        return elapsed, [started[k] - enqueued[k] for k in keys]

    def shared_env(self, n: int, sleep_s: float, pythonenv) -> float:
        """Queue n experiments with one pythonenv, each sleeping sleep_s, at once: seconds from
        the first enqueue until the last one ended."""
        keys = [f"bench-{uuid.uuid4().hex[:10]}" for _ in range(n)]
        bodies = [self.request(k, pythonenv, sleep_s) for k in keys]
        t0 = time.time()
        for body in bodies:
            enqueue(self.home.queue_root, QUEUE, body)
        while True:
            ended = self.started(self.ends)
            if all(k in ended for k in keys):
                return max(ended[k] for k in keys) - t0
            self.give_up_after(t0, f"{n - len(ended.keys() & set(keys))} of {n} experiments never ended")
            time.sleep(0.05)

    def give_up_after(self, t0: float, what: str, limit_s: float = 600) -> None:
        """A benchmark whose jobs fail would otherwise wait for ever: stop and show why."""
        if time.time() - t0 > limit_s:
            status = cli(self.home_dir, "status", env=self.env).stdout
            raise SystemExit(f"{what} after {limit_s:.0f} s; `appliance status` says:\n{status}")

    def one_at_a_time(self, samples: int, pythonenv=()) -> list[float]:
        latencies = []
        for _ in range(samples):
            _, [latency] = self.run_batch(1, pythonenv)
            latencies.append(latency)
        return latencies


def gnu_parallel(n: int, jobs: int, base: Path) -> float:
    parallel = shutil.which("parallel")
    if not parallel:
        raise SystemExit("GNU parallel is missing: apt-get install parallel")
    script = base / "trivial-parallel.py"
    script.write_text(TRIVIAL)
    log = base / "parallel-starts.log"
    t0 = time.time()
    subprocess.run([parallel, "-j", str(jobs), sys.executable, str(script), str(log), "{}", ":::",
                    *map(str, range(n))], check=True, stdout=subprocess.DEVNULL)
    return time.time() - t0


def shared_env(bench: Bench, args) -> None:
    n = bench.slots
    elapsed = bench.shared_env(n, args.sleep, [args.pythonenv])
    print(f"{n} experiments with one pythonenv ({args.pythonenv!r}, built before), {args.sleep:g} s each, on {n} "
          f"slots: all ended after {elapsed:.2f} s; ideal {args.sleep:g} s: ratio {args.sleep / elapsed:.2f}  "
          f"(aim >= 0.95; 1/{n} = {1 / n:.2f} is one after the other)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--latency-samples", type=int, default=30)
    ap.add_argument("--pythonenv", default="six==1.16.0",
                    help="requirement for the virtualenv reuse measurements")
    ap.add_argument("--sleep", type=float, default=10.0,
                    help="seconds each experiment of the shared-environment case runs")
    ap.add_argument("--shared-env-only", action="store_true",
                    help="run only case 4 (N experiments with one environment on N slots)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (slots need cgroups)")
    base = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    bench = Bench(base)
    bench.up()
    try:
        if args.shared_env_only:
            bench.run_batch(1, [args.pythonenv])  # warm: the venv exists
            shared_env(bench, args)
            return
        bench.run_batch(bench.slots * 2)  # warm: every runner has built the empty-pythonenv venv

        elapsed, latencies = bench.run_batch(args.jobs)
        par = gnu_parallel(args.jobs, bench.slots, base)
        rate, par_rate = args.jobs / elapsed, args.jobs / par
        print(f"throughput, {args.jobs} trivial experiments on {bench.slots} slots:")
        print(f"  appliance     {rate:8.1f} experiments/s  ({elapsed:.2f} s)")
        print(f"  GNU parallel  {par_rate:8.1f} jobs/s         ({par:.2f} s, -j {bench.slots}, same script)")
        print(f"  ratio appliance/parallel = {rate / par_rate:.2f}  (aim >= 0.25)")
        print(f"  enqueue-to-start under load: median {statistics.median(latencies) * 1000:.0f} ms, "
              f"p99 {percentile(latencies, 99) * 1000:.0f} ms")

        idle = bench.one_at_a_time(args.latency_samples)
        print(f"enqueue-to-start on an idle slot, {len(idle)} samples: median {statistics.median(idle) * 1000:.1f} ms, "
              f"p99 {percentile(idle, 99) * 1000:.1f} ms  (aim p50 <= 30 ms)")

        _, [first] = bench.run_batch(1, [args.pythonenv])
        _, [second] = bench.run_batch(1, [args.pythonenv])
        print(f"pythonenv {args.pythonenv!r}: first experiment starts after {first:.2f} s (builds the virtualenv), "
              f"second after {second * 1000:.0f} ms (reuses it): {first / second:.0f}x faster  (aim >= 20x)")
        shared_env(bench, args)
    finally:
        bench.down()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
