"""A new requirement set whose packages the cache already holds: uv path against the pip path.

    sudo .venv/bin/python bench/bench_envs.py [--no-appliance]

The set is a moderately big pure-PyPI one (no GPU here, little bandwidth): numpy, pandas, scipy,
scikit-learn and matplotlib with every dependency pinned, as a client's `pip freeze` sends it
(BIG below), plus six. "New but cached" is that set with one pin changed (six 1.17.0 -> 1.16.0,
both versions used before), so its key is new and every package is in the uv cache.

  1. time to a ready environment (VenvCache.prepare, as the runner calls it, building as an
     unprivileged account inside nothing): the uv path (runner.installer = "uv", the shared
     cache warmed by the cached set) against the pip path (runner.installer = "pip": pip as the
     workload, no shared cache) for a set neither has seen.
  2. unless --no-appliance: a throwaway appliance (supervisord, SeaweedFS, cgroups, as
     bench_runner.py): enqueue-to-start of an experiment with the new set, uv then pip (the
     appliance is restarted with runner.installer = "pip"); it also checks that the job's log
     showed the resolve/downloads and `status` "building env (n/m)" while the env built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.paths import Home  # noqa: E402
from appliance import pyenv  # noqa: E402
from bench.bench_runner import Bench, cli  # noqa: E402

BIG = ["cloudpickle==3.1.3", "contourpy==1.3.3", "cycler==0.12.1", "fonttools==4.68.0", "joblib==1.6.0",
       "kiwisolver==1.5.1", "matplotlib==3.11.2", "narwhals==2.29.0", "numpy==2.4.6", "packaging==26.3",
       "pandas==3.1.1", "pillow==13.0.0", "pyparsing==3.3.3", "python-dateutil==4.0.0", "scikit-learn==1.9.1",
       "scipy==1.17.1", "threadpoolctl==3.8.0", "tzdata==2026.6"]
CACHED = BIG + ["six==1.17.0"]
NEW = BIG + ["six==1.16.0"]  # one pin changed
NEW_FOR_PIP = BIG + ["six==1.15.0"]
PYTHON = shutil.which("python3", path="/usr/bin:/bin")
NOBODY = pyenv.BuildUser(65534, 65534)


def ready_times(base: Path) -> None:
    home = Home.at(base / "direct")
    uvc = pyenv.UvCache(home.uv_cache, 20 << 30)
    uv = pyenv.VenvCache(home.venv_cache, uv_cache=uvc)
    t0 = time.time()
    uv.prepare(CACHED, PYTHON, build_as=NOBODY).release()
    cold = time.time() - t0
    uv.prepare(["six==1.16.0"], PYTHON, build_as=NOBODY).release()  # the changed pin's package
    t0 = time.time()
    env = uv.prepare(NEW, PYTHON, build_as=NOBODY)
    fast = time.time() - t0
    env.release()
    pip = pyenv.VenvCache(base / "direct-pip" / "venvs")
    t0 = time.time()
    env = pip.prepare(NEW_FOR_PIP, PYTHON, build_as=NOBODY)
    slow = time.time() - t0
    env.release()
    print(f"time to a ready environment, {len(NEW)} pinned packages (numpy, pandas, scipy, scikit-learn, "
          f"matplotlib and their dependencies), a set never seen:")
    print(f"  uv, packages cached ({uvc.link_mode()})  {fast:7.2f} s   (aim <= 2 s)")
    print(f"  pip (workload user, no cache)     {slow:7.2f} s")
    print(f"  ratio pip/uv = {slow / fast:.1f}x  (aim >= 10x); uv with an empty cache took {cold:.2f} s "
          f"(downloads {uvc.size() / 2**20:.0f} MiB)")


def watch_status(home: Home, seen: set, stop: threading.Event) -> None:
    while not stop.is_set():
        for p in home.status_dir.glob("*.json"):
            try:
                step = json.loads(p.read_text()).get("step")
            except (OSError, ValueError):
                continue
            if step:
                seen.add(step)
        time.sleep(0.05)


def started_after(bench: Bench, pythonenv) -> tuple[float, str]:
    key = f"bench-{uuid.uuid4().hex[:10]}"
    from appliance.queues.local import enqueue
    t0 = time.time()
    enqueue(bench.home.queue_root, "local_bench", bench.request(key, pythonenv))
    while key not in bench.started():
        bench.give_up_after(t0, f"{key} never started", limit_s=1800)
        time.sleep(0.02)
    return bench.started()[key] - t0, key


def appliance_times(base: Path) -> None:
    (base / "appliance").mkdir()
    bench = Bench(base / "appliance")
    bench.up()
    try:
        started_after(bench, CACHED)
        started_after(bench, ["six==1.16.0"])
        steps, stop = set(), threading.Event()
        watcher = threading.Thread(target=watch_status, args=(bench.home, steps, stop))
        watcher.start()
        try:
            fast, key = started_after(bench, NEW)
        finally:
            stop.set()
            watcher.join()
        time.sleep(3)  # the job ends and uploads its output
        log = cli(bench.home_dir, "logs", key, env=bench.env).stdout
        env_lines = [t for t in log.splitlines() if t.startswith("appliance: env:")]
        cli(bench.home_dir, "config", "set", "runner.installer", "pip", env=bench.env)
        cli(bench.home_dir, "down", env=bench.env)
        cli(bench.home_dir, "up", env=bench.env)
        slow, _ = started_after(bench, NEW_FOR_PIP)
    finally:
        bench.down()
    print(f"enqueue-to-start of an experiment with that new set on a real appliance ({bench.slots} slots):")
    print(f"  uv   {fast:7.2f} s")
    print(f"  pip  {slow:7.2f} s   ratio {slow / fast:.1f}x")
    print(f"  while uv built it, the job's log had {len(env_lines)} 'appliance: env:' lines, e.g. "
          f"{env_lines[:1] + env_lines[-1:]}; status showed {sorted(steps)[:4]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-appliance", action="store_true", help="only the direct time to a ready environment")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (builds run as an unprivileged account; slots need cgroups)")
    base = Path(tempfile.mkdtemp(prefix="appliance-bench-envs-"))
    base.chmod(0o755)
    try:
        ready_times(base)
        if not args.no_appliance:
            appliance_times(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
