"""How fast the appliance follows the queues and the GPUs. Needs root (slots make cgroups) and
the Debian rabbitmq-server package; starts its own RabbitMQ, store and appliance in a temp dir.

    sudo .venv/bin/python bench/bench_controller.py [--rounds 7] [--poll 1s]

1. credential -> first job started: a StudioML request waits on a new rmq_ queue; a RabbitMQ
   credentials entry is written (atomically); we time until a runner has claimed the request
   and started the job (the runner's status file records the start).
2. GPU lost -> slot drained: NVML is faked at the pynvml boundary (tests/fake_nvml); the GPU
   disappears; we time until its (idle) slot has stopped and left supervisord.
Aims (the issue): (1) <= 1 s; (2) <= gpus.poll_interval + the drain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.queues.rabbitmq import publish  # noqa: E402
from appliance.units import parse_duration  # noqa: E402


def wait(predicate, timeout=60.0, every=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("gave up waiting")


def slot_statuses(home) -> list[dict]:
    out = []
    for p in Path(home.status_dir).glob("slot-*.json"):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--poll", default="1s", help="gpus.poll_interval for part 2")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_controller: run as root (slots create cgroups)", file=sys.stderr)
        return 2
    poll = parse_duration(args.poll)

    from tests.appliance_fixtures import make_home, stop_home
    from tests.fake_nvml.shim import fake_gpu, write_gpus
    from tests.rabbitmq_fixtures import marker_request, start_rabbit, stop_rabbit, upload_marker_workspace
    from tests.store_fixtures import start_store

    import pytest  # noqa: F401 - the fixtures' need() uses it

    tmp = Path(tempfile.mkdtemp(prefix="bench-controller-"))
    rabbit = start_rabbit(tmp / "rabbit")
    store = start_store(tmp / "store")
    gpus_json = tmp / "gpus.json"
    write_gpus(gpus_json, [fake_gpu(1)])
    appliance = make_home(tmp, f'python = "{sys.executable}"\n'
                               f'[gpus]\npoll_interval = "{args.poll}"\n'
                               '[slots.gpu]\ncpus = 1\nmemory = "512MiB"\nshm = "64MiB"\n')
    appliance.env["PYTHONPATH"] = f"{REPO / 'tests' / 'fake_nvml'}:{REPO}"
    appliance.env["APPLIANCE_FAKE_NVML"] = str(gpus_json)
    marker = tmp / "marker.log"
    try:
        appliance.cli("up", "--timeout", "90")
        home = appliance.home
        ws_key = upload_marker_workspace(store, tmp)

        # 1. credential written -> first job of its queue started
        to_claim, to_start = [], []
        entry = home.credentials_dir / "bench.toml"
        for _ in range(args.rounds):
            queue = f"rmq_bench_{uuid.uuid4().hex[:6]}"
            key, body = marker_request(store, ws_key, marker, seconds=0.05)
            publish(rabbit.url, queue, body)
            tmpfile = entry.with_name(".bench.toml.tmp")
            tmpfile.write_text(rabbit.credential())
            t0 = time.time()
            os.replace(tmpfile, entry)
            claimed = wait(lambda: next((s for s in slot_statuses(home) if s.get("experiment") == key
                                         or (s.get("last_result") or {}).get("experiment") == key), None))
            # the runner's status notes the claim time ("started") when the job begins
            t_claim = claimed.get("started") or (claimed.get("last_result") or {}).get("finished")
            lines = wait(lambda: [ln for ln in marker.read_text().splitlines()
                                  if ln.startswith("start ") and f" {key} " in ln] if marker.exists() else None)
            t_workload = float(lines[0].split()[4])
            to_claim.append(t_claim - t0)
            if t_workload:
                to_start.append(t_workload - t0)
            entry.unlink()
            wait(lambda: all("rabbitmq:bench" not in (json.loads(p.read_text()).get("sources") or {})
                             for p in (home.run_dir / "serving").glob("*.json")), timeout=30)
        print(f"credential written -> job claimed by a runner: median {statistics.median(to_claim) * 1000:.0f} ms "
              f"(min {min(to_claim) * 1000:.0f}, max {max(to_claim) * 1000:.0f}, n={len(to_claim)})")
        if to_start:
            print(f"credential written -> workload running (fetch + start): median "
                  f"{statistics.median(to_start) * 1000:.0f} ms (n={len(to_start)})")

        # 2. GPU lost -> its slot drained and gone
        from appliance import supervisor
        from appliance.lifecycle import previous_plan

        drained = []
        for _ in range(max(3, args.rounds // 2)):
            write_gpus(gpus_json, [fake_gpu(1)])
            gpu_slot = wait(lambda: next((s.name for s in previous_plan(home).slots if s.kind == "gpu"), None),
                            timeout=60)
            wait(lambda: supervisor.processes(home).get(gpu_slot) and
                 supervisor.processes(home)[gpu_slot].state == "RUNNING", timeout=60)
            time.sleep(1.5)
            t0 = time.time()
            write_gpus(gpus_json, [])
            wait(lambda: gpu_slot not in supervisor.processes(home), timeout=120, every=0.02)
            drained.append(time.time() - t0)
        print(f"GPU lost -> idle slot drained and removed: median {statistics.median(drained) * 1000:.0f} ms "
              f"(min {min(drained) * 1000:.0f}, max {max(drained) * 1000:.0f}, n={len(drained)}; "
              f"poll interval {poll:g}s)")
    finally:
        stop_home(appliance)
        stop_rabbit(rabbit)
        store.process.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
