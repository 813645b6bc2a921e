"""Every figure of the appliance's rest-and-speed table, measured as an outsider would, in one run.

    sudo .venv/bin/python bench/compare.py [--jobs 300] [--idle-seconds 60] [--repeats 3] [--quick]

It brings up a throwaway appliance with 2 CPU slots (real supervisord, SeaweedFS, cgroups;
metrics on, as installed) and measures only from outside the appliance:
  - idle CPU of every process of its tree (supervisord and all its descendants, grouped by
    program), from utime+stime deltas of /proc/PID/stat over --idle-seconds, fresh, again
    after at least --jobs experiments, and once more after `appliance down` and `up` over the
    same home (a box's reboot: the store then starts over its own data); VmRSS of each group
    after the first --throughput-jobs experiments (200: the issue's moment) and after all;
  - enqueue -> workload start: the time just before the rename of a message into the local
    queue, against the workload's first instruction, which writes time.monotonic() (the same
    system-wide clock); one at a time on idle slots;
  - enqueue -> output readable in the store (a HEAD of the output tar that succeeds);
  - --throughput-jobs trivial jobs on the 2 slots against GNU parallel -j 2 running the same
    interpreter on the same CPUs (and Slurm's srun, when installed);
  - --cpu-jobs CPU-bound jobs of --cpu-seconds each against GNU parallel;
  - `appliance submit` of a small folder, wall clock around the user's command, on an idle
    appliance (the previous submit's job settled first), with the package's .pyc files.
Each figure is min / median / max over --repeats (or over its samples), beside the issue's
baseline ("then": what was measured before this work) and its goal; throughput ratios have
their baseline (parallel) measured in the same run. `--quick` is a smoke run of everything.
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

from appliance import supervisor  # noqa: E402
from appliance.actions.submit import build_request  # noqa: E402
from appliance.paths import Home  # noqa: E402
from appliance.queues.local import enqueue  # noqa: E402
from appliance.store.client import s3_client  # noqa: E402
from appliance.store.credentials import load_credentials  # noqa: E402
from appliance.workspace import pack_directory, workspace_key  # noqa: E402
from tests.cgroup_fixtures import remove_cgroup_parent  # noqa: E402
from tests.realparts import free_port  # noqa: E402
from tests.store_fixtures import free_store_port  # noqa: E402

QUEUE = "local_compare"
MB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")
SLOTS = 2
# the first instruction notes the monotonic clock; then the key and that time go to the log
START = ("import time; T = time.monotonic()\nimport sys\n"
         "open(sys.argv[1], 'a').write(f'{sys.argv[2]} {T}\\n')\n")
CPU = ("import sys, time\nt = time.process_time()\n"
       "while time.process_time() - t < float(sys.argv[3]):\n    pass\n"
       "open(sys.argv[1], 'a').write(f'{sys.argv[2]} {time.monotonic()}\\n')\n")

# measure: (then, goal, unit, better) - "then" is the table, measured before this work
TABLE = {
    "idle CPU, whole appliance, fresh": ("3.0-3.6", 0.5, "%", "low"),
    "idle CPU, whole appliance, after jobs": ("3.0-3.6", 0.5, "%", "low"),
    "idle CPU, store, fresh": ("2.3-2.9", 0.3, "%", "low"),
    "idle CPU, store, after jobs": ("2.3-2.9", 0.3, "%", "low"),
    "idle CPU, controller, after jobs": ("0.4-0.5", None, "%", "low"),
    # not in the table: a store started again over its data spun (3.1-3.3 %) until e487261
    "idle CPU, whole appliance, after a restart": ("-", 0.5, "%", "low"),
    "idle CPU, store, after a restart": ("3.1-3.3", 0.3, "%", "low"),
    "RSS supervisord + controller": ("88", 60, "MB", "low"),
    "RSS runner + launcher (each)": ("72", 30, "MB", "low"),
    "RSS store": ("305", 150, "MB", "low"),
    # the issue measures RSS after 200 jobs (the rows above); the same after every job of the run
    "RSS supervisord + controller, after all jobs": ("-", 60, "MB", "low"),
    "RSS runner + launcher (each), after all jobs": ("-", 30, "MB", "low"),
    "RSS store, after all jobs": ("-", 150, "MB", "low"),
    "enqueue -> start p50": ("21-28", 10, "ms", "low"),
    "enqueue -> start p90": ("25-33", 20, "ms", "low"),
    "enqueue -> output in store p50": ("60", 50, "ms", "low"),
    "enqueue -> output in store p90": ("112", 50, "ms", "low"),
    "trivial jobs, appliance / parallel": ("0.49", 0.75, "x", "high"),
    "trivial jobs, appliance / srun": ("1.13", None, "x", "high"),
    "CPU-bound jobs, appliance / parallel": ("0.88", 0.97, "x", "high"),
    "appliance submit, small folder": ("120/146/169", 80, "ms", "low"),
}


def cli(home: Path, *args, env=None, check=True):
    return subprocess.run([sys.executable, "-m", "appliance", "--home", str(home), *args],
                          check=check, capture_output=True, text=True, env=env)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (all threads' children, recursively)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                try:
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
                except OSError:
                    pass
        except OSError:
            pass
    return out


def groups(home: Home) -> dict[str, list[int]]:
    """Every process of the appliance's tree by program: supervisord, controller, store, slot-N."""
    root = supervisor.supervisord_pid(home)
    programs = {info.pid: name for name, info in supervisor.processes(home).items() if info.pid}
    out: dict[str, list[int]] = {"supervisord": [root]}
    for child in descendants(root)[1:]:
        if child in programs:
            out[programs[child]] = descendants(child)
    return out


def idle_cpu(home: Home, seconds: float) -> dict[str, float]:
    """% of one core per program over `seconds` (processes that end meanwhile are left out)."""
    before = {}
    for name, pids in groups(home).items():
        for pid in pids:
            try:
                before[(name, pid)] = cpu_ticks(pid)
            except OSError:
                pass
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    out: dict[str, float] = {}
    for (name, pid), ticks in before.items():
        try:
            out[name] = out.get(name, 0.0) + (cpu_ticks(pid) - ticks) / TICK / elapsed * 100
        except OSError:
            pass
    return out


def rss(home: Home) -> dict[str, float]:
    out = {}
    for name, pids in groups(home).items():
        total = 0
        for pid in pids:
            try:
                total += rss_bytes(pid)
            except OSError:
                pass
        out[name] = total / MB
    return out


def warm_interpreters(home: Home) -> dict[str, float]:
    """MB of VmRSS of each slot's warm interpreter (the next job's own process, runner/warm.py)."""
    out = {}
    for name, pids in groups(home).items():
        for pid in pids:
            try:
                if b"appliance: a warm interpreter" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out[name] = out.get(name, 0.0) + rss_bytes(pid) / MB
            except OSError:
                pass
    return out


def percentile(values, p):
    """The p-th percentile, interpolated between the nearest samples."""
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def spread(values) -> str:
    if not values:
        return "-"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


class Appliance:
    def __init__(self, base: Path):
        self.base = base
        self.home_dir = base / "home"
        self.home = Home.at(self.home_dir)
        self.log = base / "starts.log"
        self.env = {**os.environ, "APPLIANCE_CGROUP_PARENT": f"appliance-compare-{uuid.uuid4().hex[:6]}",
                    "MC_CONFIG_DIR": str(base / "mc")}
        self.jobs_run = 0

    def up(self) -> None:
        self.base.chmod(0o755)  # workloads run as slot accounts: they must reach the log
        self.log.touch(mode=0o666)
        self.log.chmod(0o666)
        self.home_dir.mkdir(parents=True)
        self.home.config_file.write_text(
            "[host]\nreserved_cpus = 0\nreserved_memory = \"1GiB\"\n"
            f"[slots.cpu]\ncount = {SLOTS}\nmemory = \"1GiB\"\nshm = \"64MiB\"\n"
            f"[object_store]\nport = {free_store_port()}\n[runner]\ndrain_timeout = \"10s\"\n"
            f"[metrics]\nlisten = \"127.0.0.1:{free_port()}\"\n")
        cli(self.home_dir, "up", env=self.env)
        port = self.home.config_file.read_text().split("port = ")[1].split()[0]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.creds = load_credentials(self.home)
        self.ws = self.base / "ws"
        self.ws.mkdir()
        (self.ws / "start.py").write_text(START)
        (self.ws / "cpu.py").write_text(CPU)
        tar, sha = pack_directory(self.ws, out_dir=self.base)
        self.ws_key = workspace_key(sha)
        self.client = s3_client(self.endpoint, self.creds.access_key, self.creds.secret_key)
        self.client.upload_file(str(tar), "appliance", self.ws_key)

    def restart(self) -> None:
        """`appliance down` then `up` over the same home, as a lab's box does at a reboot."""
        cli(self.home_dir, "down", env=self.env)
        cli(self.home_dir, "up", env=self.env)

    def down(self) -> None:
        cli(self.home_dir, "down", env=self.env, check=False)
        remove_cgroup_parent(self.env["APPLIANCE_CGROUP_PARENT"])

    def request(self, key: str, script: str = "start.py", extra=()) -> bytes:
        body = build_request(
            key=key, script=script, script_args=[str(self.log), key, *extra], workspace_key=self.ws_key,
            workspace_dir=str(self.ws), endpoint=self.endpoint, bucket="appliance",
            access_key=self.creds.access_key, secret_key=self.creds.secret_key, region="us-east-1",
            resources={"cpus": 1, "gpus": 0, "ram": "256mb", "hdd": "1gb", "gpuMem": "0gb"},
            max_duration=None, lifetime=None, save_every="3m", env={}, pip=[], pythonenv=[],
            pythonver="3.11", studioml_home=self.home.studioml_home, now=time.time())
        return json.dumps(body).encode()

    def logged(self) -> dict[str, float]:
        out = {}
        for line in self.log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = float(parts[1])
        return out

    def settled(self) -> bool:
        root = self.home.queue_root
        waiting = [p for p in (root / QUEUE).glob("*") if p.name != "lock.lock"] if (root / QUEUE).is_dir() else []
        claimed = list((root / ".claimed" / QUEUE).glob("*")) if (root / ".claimed" / QUEUE).is_dir() else []
        return not waiting and not claimed

    def wait(self, keys, limit_s: float = 900) -> None:
        t0 = time.monotonic()
        while True:
            got = self.logged()
            if all(k in got for k in keys) and self.settled():
                return
            if time.monotonic() - t0 > limit_s:
                raise SystemExit(f"compare: {sum(k in got for k in keys)}/{len(keys)} jobs ran within {limit_s:.0f} s; "
                                 f"see {self.home.logs_dir}")
            time.sleep(0.05)

    def batch(self, n: int, script="start.py", extra=()) -> float:
        """n jobs queued at once; seconds until every one ran and was settled."""
        keys = [f"c-{uuid.uuid4().hex[:12]}" for _ in range(n)]
        bodies = [self.request(k, script, extra) for k in keys]
        t0 = time.monotonic()
        for body in bodies:
            enqueue(self.home.queue_root, QUEUE, body)
        self.wait(keys)
        self.jobs_run += n
        return time.monotonic() - t0

    def one(self) -> tuple[float, float]:
        """(enqueue -> start, enqueue -> output readable) in ms of one job on idle slots."""
        key = f"l-{uuid.uuid4().hex[:12]}"
        folder = self.home.queue_root / QUEUE
        folder.mkdir(exist_ok=True)
        msgid = str(uuid.uuid4())
        tmp = folder / f".{msgid}.tmp"
        tmp.write_bytes(self.request(key))
        os.chmod(tmp, 0o660)
        t0 = time.monotonic()
        os.rename(tmp, folder / msgid)
        out_key = f"experiments/{key}/output.tar"
        started = output = None
        deadline = t0 + 120
        while output is None and time.monotonic() < deadline:
            if started is None:
                started = self.logged().get(key)
            try:
                self.client.head_object(Bucket="appliance", Key=out_key)
                output = time.monotonic()
            except Exception:  # noqa: BLE001 - not there yet
                time.sleep(0.002)
        if started is None:
            started = self.logged().get(key)
        self.wait([key])
        self.jobs_run += 1
        if started is None or output is None:
            raise SystemExit(f"compare: job {key} did not start or upload within 120 s")
        return (started - t0) * 1000, (output - t0) * 1000


def gnu_parallel(base: Path, n: int, script: str, extra=()) -> float:
    """Seconds GNU parallel -j SLOTS takes to run `script` n times with this interpreter on the slots' CPUs."""
    log = base / "parallel.log"
    log.write_text("")
    cpus = ",".join(str(c) for c in range(min(SLOTS, os.cpu_count() or 1)))
    argv = ["taskset", "-c", cpus, shutil.which("parallel"), "-j", str(SLOTS), sys.executable,
            str(base / "ws" / script), str(log), "{}", *extra, ":::", *[str(i) for i in range(n)]]
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - t0


def srun(base: Path, n: int, script: str) -> float | None:
    binary = shutil.which("srun")
    if not binary:
        return None
    log = base / "srun.log"
    t0 = time.monotonic()
    procs = [subprocess.Popen([binary, "-n1", "-c1", sys.executable, str(base / "ws" / script), str(log), str(i)])
             for i in range(n)]
    for p in procs:
        p.wait()
    return time.monotonic() - t0


def submit_times(app: Appliance, n: int) -> list[float]:
    folder = app.base / "small"
    folder.mkdir(exist_ok=True)
    for i in range(5):
        (folder / f"f{i}.py").write_text(f"print({i})\n")
    out = []
    # as installed (pip compiles the package): the first, untimed submit may write the .pyc files
    env = {k: v for k, v in app.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for i in range(-1, n):
        # on an idle appliance, as a user submits one folder (and as the start latency is taken):
        # the previous submit's job, run meanwhile, would otherwise take the CPUs from this one
        app.wait([], limit_s=300)
        time.sleep(0.3)
        (folder / "changed.txt").write_text(str(uuid.uuid4()))  # a new workspace each time
        t0 = time.monotonic()
        result = cli(app.home_dir, "submit", "--no-freeze", "--ram", "256mb", "--queue", QUEUE, "--dir", str(folder), "f0.py",
                     env=env, check=False)
        took = (time.monotonic() - t0) * 1000
        if result.returncode != 0:
            raise SystemExit(f"compare: appliance submit failed: {result.stderr.strip()}")
        if i >= 0:
            out.append(took)
    app.wait([], limit_s=300)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=300, help="jobs run before the second idle sample (at least)")
    ap.add_argument("--idle-seconds", type=float, default=60, help="length of each idle CPU window")
    ap.add_argument("--settle", type=float, default=20, help="seconds of rest before each idle sample")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each figure")
    ap.add_argument("--latency-samples", type=int, default=30)
    ap.add_argument("--throughput-jobs", type=int, default=200)
    ap.add_argument("--cpu-jobs", type=int, default=6)
    ap.add_argument("--cpu-seconds", type=float, default=10)
    ap.add_argument("--submits", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="a smoke run: every figure, small numbers")
    ap.add_argument("--keep", action="store_true", help="leave the appliance running at the end")
    args = ap.parse_args()
    if args.quick:
        args.jobs, args.idle_seconds, args.settle, args.repeats = 40, 10, 5, 2
        args.latency_samples, args.throughput_jobs, args.cpu_jobs, args.cpu_seconds, args.submits = 8, 20, 2, 2, 3
    if os.geteuid() != 0:
        print("compare: run as root (slots create cgroups)", file=sys.stderr)
        return 2
    if not shutil.which("parallel"):
        print("compare: GNU parallel is missing: apt-get install parallel", file=sys.stderr)
        return 2
    import compileall  # the bytecode install.sh makes (-OO for runners): no runner compiles from source
    compileall.compile_dir(str(ROOT / "appliance"), quiet=1, optimize=[0, 2])
    base = Path(tempfile.mkdtemp(prefix="appliance-compare-"))
    app = Appliance(base)
    app.up()
    fig: dict[str, list[float]] = {}
    note: dict[str, str] = {}
    try:
        def idle(label: str) -> None:
            time.sleep(args.settle)
            for _ in range(args.repeats):
                by = idle_cpu(app.home, args.idle_seconds)
                print(f"  idle {label}: " + ", ".join(f"{k} {v:.2f}%" for k, v in sorted(by.items())), flush=True)
                fig.setdefault(f"idle CPU, whole appliance, {label}", []).append(sum(by.values()))
                fig.setdefault(f"idle CPU, store, {label}", []).append(by.get("store", 0.0))
                fig.setdefault(f"idle CPU, controller, {label}", []).append(by.get("controller", 0.0))

        def memory(after: str) -> dict[str, float]:
            sizes = rss(app.home)
            runners = [v for k, v in sizes.items() if k.startswith("slot-")]
            fig[f"RSS supervisord + controller{after}"] = [sizes.get("supervisord", 0) + sizes.get("controller", 0)]
            fig[f"RSS runner + launcher (each){after}"] = runners
            fig[f"RSS store{after}"] = [sizes.get("store", 0)]
            note[f"RSS store{after}"] = "weed and the forwarder in front of it"
            warm = warm_interpreters(app.home)
            if warm:
                note[f"RSS runner + launcher (each){after}"] = (
                    "each slot's tree, with its next job's warm interpreter: "
                    + ", ".join(f"{slot} {mb:.1f} MB of it" for slot, mb in sorted(warm.items())))
            print(f"\n{app.jobs_run} jobs run; RSS now: " + ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(sizes.items())),
                  flush=True)
            return sizes

        print(f"appliance at {app.home_dir}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
        idle("fresh")
        for repeat in range(args.repeats):
            took = app.batch(args.throughput_jobs)
            if repeat == 0:  # the moment: 200 jobs run (its slots back at rest, warm)
                time.sleep(3)
                memory("")
            par = gnu_parallel(base, args.throughput_jobs, "start.py")
            fig.setdefault("trivial jobs, appliance / parallel", []).append(par / took)
            print(f"  {args.throughput_jobs} trivial jobs: appliance {took:.2f} s, parallel {par:.2f} s", flush=True)
            slurm = srun(base, args.throughput_jobs, "start.py")
            if slurm is None:
                note["trivial jobs, appliance / srun"] = "srun: not installed"
            else:
                fig.setdefault("trivial jobs, appliance / srun", []).append(slurm / took)
        for _ in range(args.repeats):
            extra = [str(args.cpu_seconds)]
            took = app.batch(args.cpu_jobs, "cpu.py", extra)
            par = gnu_parallel(base, args.cpu_jobs, "cpu.py", extra)
            fig.setdefault("CPU-bound jobs, appliance / parallel", []).append(par / took)
            print(f"  {args.cpu_jobs} x {args.cpu_seconds:g} s CPU jobs: appliance {took:.2f} s, parallel {par:.2f} s",
                  flush=True)
        time.sleep(2)
        starts, outputs = [], []
        for _ in range(args.latency_samples):
            start, output = app.one()
            starts.append(start)
            outputs.append(output)
            time.sleep(0.3)
        print("  enqueue -> start ms: " + " ".join(f"{s:.1f}" for s in starts), flush=True)
        fig["enqueue -> start p50"] = [percentile(starts, 50)]
        fig["enqueue -> start p90"] = [percentile(starts, 90)]
        fig["enqueue -> output in store p50"] = [percentile(outputs, 50)]
        fig["enqueue -> output in store p90"] = [percentile(outputs, 90)]
        note["enqueue -> start p50"] = f"samples min/median/max {spread(starts)}"
        note["enqueue -> output in store p50"] = f"samples min/median/max {spread(outputs)}"
        fig["appliance submit, small folder"] = submit_times(app, args.submits)
        if app.jobs_run < args.jobs:
            app.batch(args.jobs - app.jobs_run)
        idle("after jobs")
        memory(", after all jobs")
        app.restart()
        idle("after a restart")
        print(f"\n{'measure':46} {'min / median / max':>26} {'then':>12} {'goal':>8}")
        for name, (then, goal, unit, better) in TABLE.items():
            values = fig.get(name, [])
            aim = "-" if goal is None else f"{'<=' if better == 'low' else '>='} {goal:g}"
            ok = "" if goal is None or not values else (
                "  ok" if (statistics.median(values) <= goal if better == "low" else statistics.median(values) >= goal)
                else "  MISSED")
            print(f"{name:46} {spread(values):>26} {then:>12} {aim:>8} {unit}{ok}"
                  + (f"   ({note[name]})" if name in note else ""))
    finally:
        if args.keep:
            print(f"\nkept running: appliance --home {app.home_dir} (APPLIANCE_CGROUP_PARENT="
                  f"{app.env['APPLIANCE_CGROUP_PARENT']}); stop with `appliance down`")
        else:
            app.down()
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
