"""Runs the appliance on the card and gathers the facts tests/gpu/proof.py judges.

Started by tests/gpu/run.sh with the appliance's own python (its temporary virtualenv), as root:

    python drive.py --home H --work W --python BOX_PYTHON --deadline EPOCH --report PATH

1. records what NVML answers (idle), starts the appliance (`appliance up`) with one GPU slot
   and one CPU slot; reads `status --json`, `appliance gpu list`, the plan;
2. phase A: a GPU job (tests/gpu/workload.py probe: ctypes CUDA, then PyTorch, busy for a while)
   asking 1 GiB of GPU memory, a request asking more GPU memory than the card has, and, once the
   GPU slot is busy, a CPU job; /metrics scraped and NVML recorded while the GPU job runs;
3. phase B: `slots.gpu.share = 2` applied; two jobs on the card at once, one within its share
   and one over it (the watch must stop it);
4. the report after every phase (so a run cut short still leaves one), `appliance down` at the
   end (run.sh's trap does it too).

Every wait is bounded by --deadline; what did not happen in time is a FAIL that says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proof  # noqa: E402  (beside this file)
from proof import GiB, answer, fail, ok  # noqa: E402

HERE = Path(__file__).resolve().parent
OVER_SHARE = "GPU memory over the slot's share"


class Run:
    def __init__(self, args):
        self.home, self.work = Path(args.home), Path(args.work)
        # the checks end 40s before the deadline: `appliance down` and the report get the rest
        self.box_python, self.deadline, self.report_path = args.python, args.deadline - 40, Path(args.report)
        self.bin = str(Path(sys.executable).parent / "appliance")
        self.checks, self.nvml, self.facts = [], {}, {"steps": []}
        self.metrics_port, self.store_port = free_port(), free_port(limit=55000)  # store: below 55530
        self.t0 = time.time()

    # -- plumbing ------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.time()

    def cli(self, *args, timeout=60.0, bounded=True) -> subprocess.CompletedProcess:
        timeout = max(5.0, min(timeout, self.left())) if bounded else timeout
        t = time.time()
        try:
            p = subprocess.run([self.bin, "--home", str(self.home), *args], capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired as e:
            p = subprocess.CompletedProcess(e.cmd, 124, _s(e.stdout), _s(e.stderr) + f"\n(timed out after {timeout:.0f}s)")
        self.facts["steps"].append({"cmd": " ".join(args[:3]), "rc": p.returncode, "at": round(t - self.t0, 2),
                                    "s": round(time.time() - t, 2)})
        return p

    def status(self) -> dict:
        p = self.cli("status", "--json", timeout=30)
        try:
            return json.loads(p.stdout)
        except ValueError:
            return {}

    def plan(self) -> dict:
        try:
            return json.loads((self.home / "run" / "plan.json").read_text())
        except (OSError, ValueError):
            return {}

    def add(self, check) -> None:
        self.checks.append(check)
        print(check.line(), flush=True)

    def write_report(self) -> None:
        data = proof.report(self.checks, self.nvml, self.facts)
        tmp = self.report_path.with_name(self.report_path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.report_path)

    def record_nvml(self, label: str) -> dict:
        import pynvml
        rec = proof.record_nvml(pynvml, with_topology=(label == "idle"))
        rec["t"] = time.time()
        self.nvml.setdefault(label, rec) if label == "idle" else self.nvml.setdefault(label, []).append(rec)
        return rec

    # -- the store and the queue ---------------------------------------------------------
    def store(self):
        if not hasattr(self, "_s3"):
            from appliance.config import load_config
            from appliance.paths import Home
            from appliance.store.client import s3_client
            from appliance.store.credentials import load_credentials
            from appliance.store.server import endpoint_url
            home = Home.at(self.home)
            config = load_config(home.config_file)
            creds = load_credentials(home)
            self._s3 = (s3_client(endpoint_url(config), creds.access_key, creds.secret_key), config.object_store.bucket)
        return self._s3

    def result_record(self, key: str):
        try:
            client, bucket = self.store()
            body = client.get_object(Bucket=bucket, Key=f"experiments/{key}/appliance-result.json")["Body"].read()
            return json.loads(body)
        except Exception:  # noqa: BLE001 - not there yet (or the store blinked): look again
            return None

    def submit(self, workspace: Path, *args, resources=()) -> dict:
        job = {"enqueued": time.time(), "args": list(args), "resources": list(resources)}
        p = self.cli("submit", "--no-freeze", "--hdd", "1gb", "--dir", str(workspace), *resources,
                     "workload.py", *args, timeout=60)
        lines = p.stdout.strip().splitlines()
        if p.returncode != 0 or not lines:
            job.update(error=f"submit exited {p.returncode}: {p.stderr.strip()[-300:]}", done=True)
        else:
            job["key"] = lines[-1].strip()
        return job

    def settle(self, job: dict, dead: dict, plan: dict) -> None:
        """Fill in a job's end: its result record and output, or its dead letter."""
        if job.get("done"):
            return
        if job["key"] in dead:
            job.update(dead_reason=dead[job["key"]], done=True)
            return
        record = self.result_record(job["key"])
        if record is None:
            return
        job.update({k: record.get(k) for k in ("outcome", "class", "reason", "slot", "finished", "report", "gpu")})
        kinds = {s["name"]: s.get("kind") for s in plan.get("slots", [])}
        job["slot_kind"] = kinds.get(job.get("slot"))
        logs = self.cli("logs", job["key"], timeout=30)
        events = []
        for line in logs.stdout.splitlines():
            if line.startswith("PROOF "):
                try:
                    events.append(json.loads(line[6:]))
                except ValueError:
                    pass
        job["probe"] = next((e for e in reversed(events) if "mode" in e), {})
        job["t_started"] = next((e["t"] for e in events if e.get("event") == "started"), None)
        job["output_tail"] = logs.stdout[-1500:]
        job["done"] = True

    def wait(self, jobs: list, until: float, tick=None) -> None:
        plan = self.plan()
        while time.time() < until and not all(j.get("done") for j in jobs):
            if tick:
                tick()
            dead = self.dead_letters() if any(j.get("expect_refusal") and not j.get("done") for j in jobs) else {}
            for j in jobs:
                self.settle(j, dead, plan)
            time.sleep(1.0)
        for j in jobs:
            if not j.get("done"):
                j["error"] = j.get("error") or f"not finished after {until - j['enqueued']:.0f}s"

    def dead_letters(self) -> dict:
        p = self.cli("queue", "dead", "--json", timeout=20)
        try:
            return {r.get("experiment"): r.get("reason") for r in json.loads(p.stdout)}
        except ValueError:
            return {}

    def running(self, key: str):
        """The slot running experiment `key` now, or None."""
        for s in self.status().get("slots", []):
            if s.get("experiment") == key:
                return s
        return None

    def scrape(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=3) as r:
                return r.read().decode()
        except OSError as e:
            return f"# scrape failed: {e}"

    def workspace(self, name: str) -> Path:
        ws = self.work / name
        ws.mkdir(parents=True, exist_ok=True)
        shutil.copy(HERE / "workload.py", ws / "workload.py")
        return ws

    # -- the proof -----------------------------------------------------------------------
    def config(self) -> str:
        return ("# written by tests/gpu/drive.py for the proof on a real GPU\n"
                "[host]\nreserved_cpus = 0\n[slots.cpu]\ncount = 1\n"
                "[slots.gpu]\nshare = 1\n"
                f"[object_store]\nport = {self.store_port}\n"
                f"[metrics]\nlisten = \"127.0.0.1:{self.metrics_port}\"\n"
                f"[runner]\npython = \"{self.box_python}\"\ndrain_timeout = \"20s\"\n")

    def start(self) -> bool:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "appliance.toml").write_text(self.config())
        t = time.time()
        p = self.cli("up", "--timeout", "120", timeout=150)
        self.facts["up"] = {"rc": p.returncode, "s": round(time.time() - t, 1), "out": (p.stdout + p.stderr)[-2000:]}
        if p.returncode != 0:
            self.add(fail("appliance up", f"exited {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}"))
            return False
        self.add(ok("appliance up", seconds=round(time.time() - t, 1)))
        return True

    def phase_a(self, uuid: str, card_bytes: int) -> None:
        plan = self.plan()
        slots = proof.gpu_slots(plan)
        slot_uuid = slots[0]["gpus"][0] if slots else uuid
        gpu_job = self.submit(self.workspace("probe"), "probe", "--busy", "20", "--bytes", str(GiB),
                              resources=["--gpus", "1", "--gpu-mem", "1gb", "--ram", "4gb"])
        asked = (math.ceil(card_bytes / GiB) + 8) if card_bytes else 4096
        too_big = self.submit(self.workspace("too-big"), "probe",
                              resources=["--gpus", "1", "--gpu-mem", f"{asked}gb", "--ram", "1gb"])
        too_big.update(expect_refusal=True, asked_bytes=asked * GiB)
        jobs = [gpu_job, too_big]
        # the CPU job goes in once the GPU slot is busy, so the CPU slot takes it
        limit = time.time() + min(90, self.left() - 30)
        while ("key" in gpu_job and time.time() < limit and not self.running(gpu_job["key"])
               and self.result_record(gpu_job["key"]) is None):
            time.sleep(0.5)
        gpu_job["seen_running"] = time.time()
        cpu_job = self.submit(self.workspace("cpu"), "probe", resources=["--gpus", "0", "--ram", "1gb"])
        jobs.append(cpu_job)
        scrapes = []
        last = {"t": gpu_job["seen_running"]}

        def tick():
            if not gpu_job.get("done"):
                scrapes.append(self.scrape())
                if time.time() - last["t"] > 6:  # NVML while the job holds memory and runs kernels
                    self.record_nvml("busy")
                    last["t"] = time.time()

        self.wait(jobs, time.time() + min(150, self.left() - 100), tick)
        self.facts["phase_a"] = {"gpu_job": gpu_job, "too_big": too_big, "cpu_job": cpu_job,
                                 "scrapes": [s for s in scrapes if "appliance_gpu" in s][-3:]}
        self.add(proof.judge_cuda(gpu_job, slot_uuid))
        self.add(proof.judge_torch(gpu_job, slot_uuid))
        self.add(proof.judge_cpu_slot(cpu_job))
        self.add(proof.judge_memory_matching(card_bytes, too_big, gpu_job))
        idle_used = (answer(self.nvml["idle"], "nvmlDeviceGetMemoryInfo") or {}).get("used", 0)
        busy = bool((proof.probe_of(gpu_job).get("torch") or {}).get("busy_matmuls"))
        self.add(proof.judge_metrics(scrapes, idle_used, busy, uuid))  # metrics name the card, not a MIG slice
        self.add(proof.judge_timings(gpu_job))

    def phase_b(self) -> None:
        name = "shared GPU (share = 2): two jobs at once; one over its share stopped (gpu memory)"
        if self.left() < 110:
            self.add(fail(name, f"not run: only {self.left():.0f}s left of the time limit"))
            return
        if (answer(self.nvml["idle"], "nvmlDeviceGetMigMode") or [0])[0] == 1:
            self.add(proof.na(name, "MIG enabled: MIG devices are slots of their own, not shared"))
            return
        # one write of appliance.toml: the controller re-plans on its own (an `appliance up` now
        # would race it); the CPU slot has done its part, its CPUs go to the second GPU slot
        config = self.home / "appliance.toml"
        tmp = config.with_name("appliance.toml.tmp")
        tmp.write_text(self.config().replace("count = 1", "count = 0").replace("share = 1", "share = 2"))
        tmp.replace(config)
        t_replan = time.time()
        limit, slots, names = t_replan + min(90, self.left() - 60), [], set()
        while time.time() < limit:
            slots = proof.gpu_slots(self.plan())
            names = {s["name"] for s in self.status().get("slots", []) if s.get("state") == "RUNNING"}
            if len(slots) == 2 and {s["name"] for s in slots} <= names:
                break
            time.sleep(1.0)
        self.facts["replan_s"] = round(time.time() - t_replan, 1)
        if len(slots) != 2 or not {s["name"] for s in slots} <= names:
            up = self.cli("up", "--timeout", "90", timeout=120)  # the controller did not: as a user would
            slots = proof.gpu_slots(self.plan())
            if up.returncode != 0 or len(slots) != 2:
                self.add(fail(name, f"share = 2 not applied by the controller nor by `appliance up` (rc "
                                    f"{up.returncode}, {len(slots)} GPU slots): {(up.stderr or up.stdout).strip()[-300:]}"))
                return
        share = int(slots[0].get("gpu_memory_bytes") or 0)
        good = self.submit(self.workspace("good"), "hold", "--bytes", str(GiB), "--seconds", "25",
                           resources=["--gpus", "1", "--ram", "1gb"])
        hog = self.submit(self.workspace("hog"), "hold", "--bytes", str(share + 2 * GiB), "--seconds", "40",
                          resources=["--gpus", "1", "--ram", "1gb"])
        last = {"t": 0.0}

        def tick():
            if os.environ.get("APPLIANCE_FAKE_NVML"):
                self.rehearse_processes({good.get("key"): GiB, hog.get("key"): share + 2 * GiB})
            if time.time() - last["t"] > 3 and not (good.get("done") and hog.get("done")):
                self.record_nvml("shared")
                last["t"] = time.time()

        self.wait([good, hog], time.time() + min(100, self.left() - 15), tick)
        procs = [p for rec in self.nvml.get("shared", []) + self.nvml.get("busy", [])
                 for p in (answer(rec, "nvmlDeviceGetComputeRunningProcesses") or [])]
        errors = {proof.error_of(rec, "nvmlDeviceGetComputeRunningProcesses")
                  for rec in self.nvml.get("shared", [])} - {""}
        shared = {"good": good, "hog": hog, "share_bytes": share,
                  "nvml_attributed": any(p.get("usedGpuMemory") for p in procs),
                  "nvml_processes_note": (f"nvmlDeviceGetComputeRunningProcesses: {sorted(errors)}" if errors else
                                          "usedGpuMemory is None" if procs else "empty process list while jobs held memory")}
        self.facts["phase_b"] = shared
        self.add(proof.judge_share(shared))

    def rehearse_processes(self, memory: dict) -> None:
        """Rehearsal only (the fake NVML): list the running jobs' workloads on the fake card with
        `memory[key]` bytes each, as the real NVML would list them."""
        from appliance.paths import Home
        from appliance.runner.status import read_status
        path = Path(os.environ["APPLIANCE_FAKE_NVML"])
        box = json.loads(path.read_text())
        procs = []
        for slot in proof.gpu_slots(self.plan()):
            st = read_status(Home.at(self.home), slot["name"]) or {}
            pid = (st.get("workload") or {}).get("pid")
            if pid and st.get("experiment") in memory:
                procs.append({"pid": pid, "used_memory": memory[st["experiment"]], "sm_util": 50})
        box["gpus"][0]["processes"] = procs
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(box))
        tmp.replace(path)

    def run(self) -> int:
        try:
            import pynvml  # noqa: F401
        except ImportError as e:
            self.add(fail("NVML from python", f"pynvml is missing from the appliance's virtualenv: {e}"))
            return self.finish()
        rec = self.record_nvml("idle")
        self.facts["driver"] = {k: rec.get(k) for k in ("driver_version", "cuda_driver_version", "pynvml")}
        uuid = answer(rec, "nvmlDeviceGetUUID")
        card_bytes = (answer(rec, "nvmlDeviceGetMemoryInfo") or {}).get("total") or 0
        print(f"card: {answer(rec, 'nvmlDeviceGetName')} {uuid} {card_bytes / GiB:.1f}GiB, "
              f"driver {(rec.get('driver_version') or {}).get('value')}", flush=True)
        self.write_report()
        try:
            if not self.start():
                return self.finish()
            status = self.status()
            gpu_list = self.cli("gpu", "list", timeout=30)
            self.facts["status_gpus"], self.facts["gpu_list"] = status.get("gpus"), gpu_list.stdout[-2000:]
            self.facts["plan"] = self.plan()
            self.add(proof.judge_inventory(rec, status, gpu_list.stdout))
            self.add(proof.judge_plan(rec, self.plan()))
            self.add(proof.judge_affinity(rec, self.plan()))
            self.add(proof.judge_mig(rec, self.plan()))
            self.write_report()
            self.phase_a(uuid, card_bytes)
            self.write_report()
            self.phase_b()
        except Exception as e:  # noqa: BLE001 - the proof's own fault: a FAIL with the reason, and the report
            import traceback
            self.facts["traceback"] = traceback.format_exc()
            self.add(fail("the proof itself", f"{type(e).__name__}: {e}"))
        finally:
            t = time.time()
            p = self.cli("down", "--timeout", "25", timeout=35, bounded=False)
            self.facts["down"] = {"rc": p.returncode, "s": round(time.time() - t, 1)}
        return self.finish()

    def finish(self) -> int:
        self.write_report()
        print(proof.summary(self.checks), flush=True)
        return proof.exit_code(self.checks)


def free_port(limit: int = 65535) -> int:
    import socket
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < limit:
            return port


def _s(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else (v or "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--python", required=True, help="the box's python, which runs the workloads")
    p.add_argument("--deadline", type=float, required=True, help="epoch seconds by which all is done")
    p.add_argument("--report", required=True)
    return Run(p.parse_args(argv)).run()


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
