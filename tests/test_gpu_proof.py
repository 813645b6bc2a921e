"""The proof on a real GPU (tests/gpu/): its verdicts and report against recorded NVML answers
(tests/fixtures/nvml_h100.json), its NVML recorder against the fake NVML, and run.sh on a box
without a driver. Nothing here needs a GPU."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pynvml
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "gpu"))
import proof  # noqa: E402
from proof import FAIL, NA, OK, GiB  # noqa: E402
from tests.fake_nvml import shim  # noqa: E402

RECORDED = json.loads((REPO / "tests" / "fixtures" / "nvml_h100.json").read_text())
IDLE = RECORDED["idle"]
UUID = proof.answer(IDLE, "nvmlDeviceGetUUID")
NAME = proof.answer(IDLE, "nvmlDeviceGetName")
TOTAL = proof.answer(IDLE, "nvmlDeviceGetMemoryInfo")["total"]


@pytest.fixture
def fake_nvml(tmp_path):
    """pynvml faked in this process (its own functions back afterwards): write(description)."""
    saved = {k: v for k, v in vars(pynvml).items() if k.startswith("nvml")}
    path = tmp_path / "gpus.json"
    shim.install(path)
    yield lambda description: path.write_text(json.dumps(description))
    for k, v in saved.items():
        setattr(pynvml, k, v)


def status_of(**device) -> dict:
    return {"gpus": {"devices": [{"index": 0, "uuid": UUID, "name": NAME, "memory_bytes": TOTAL,
                                  "healthy": True, "mig_enabled": False, **device}], "problem": ""}}


def plan_of(*slots) -> dict:
    return {"slots": [{"name": "slot-0", "kind": "cpu", "cpus": [0], "gpus": []}, *slots]}


GPU_SLOT = {"name": "slot-1", "kind": "gpu", "cpus": [1, 2], "gpus": [UUID], "gpu_memory_bytes": TOTAL}


def job(probe=None, **fields) -> dict:
    return {"key": "k1", "enqueued": 100.0, "slot": "slot-1", "slot_kind": "gpu", "outcome": "success",
            "probe": probe or {}, **fields}


def probe(**fields) -> dict:
    return {"mode": "probe", "t_start": 103.5, "t_end": 130.0, "cuda_visible_devices": UUID,
            "cuda": {"device_count": 1, "uuids": [UUID], "copy_ok": True, "allocated_bytes": GiB},
            "torch": {"version": "2.5.1", "cuda_available": True, "device_count": 1, "uuid": UUID,
                      "copy_ok": True, "busy_matmuls": 400}, **fields}


def test_the_summary_line_and_the_exit_code():
    checks = [proof.ok("a", x=1), proof.na("b", "MIG disabled"), proof.fail("c", "broken")]
    assert proof.summary(checks) == "gpu proof: 1 ok, 1 n/a, 1 FAIL"
    assert proof.exit_code(checks) == 1
    assert proof.exit_code(checks[:2]) == 0
    assert proof.exit_code([]) == 1  # nothing proved is not a pass
    assert [c.line().split()[0] for c in checks] == ["ok", "n/a:", "FAIL"]
    assert checks[1].line().startswith("n/a: MIG disabled")
    assert "[x=1]" in checks[0].line() and "broken" in checks[2].line()
    data = proof.report(checks, {"idle": IDLE}, {"up": {"rc": 0}})
    assert data["summary"] == "gpu proof: 1 ok, 1 n/a, 1 FAIL" and data["exit_code"] == 1
    assert data["nvml"]["idle"] is IDLE and json.loads(json.dumps(data))["checks"][2]["status"] == FAIL


def test_inventory_and_plan_against_the_recorded_card():
    listing = f"GPU 0  {NAME}  {UUID}  79.6GiB  slot-1"
    assert proof.judge_inventory(IDLE, status_of(), listing).status == OK
    assert proof.judge_inventory(IDLE, status_of(name="Fake GPU 0"), listing).status == FAIL
    assert proof.judge_inventory(IDLE, status_of(memory_bytes=8 * GiB), listing).status == FAIL
    assert proof.judge_inventory(IDLE, {"gpus": {"devices": [], "problem": "NVML unavailable"}}, listing).status == FAIL
    assert proof.judge_inventory(IDLE, status_of(), "no GPUs").status == FAIL
    assert proof.judge_plan(IDLE, plan_of(GPU_SLOT)).status == OK
    two = {**GPU_SLOT, "gpus": [UUID, "GPU-other"]}
    assert proof.judge_plan(IDLE, plan_of(two)).status == FAIL
    assert proof.judge_plan(IDLE, plan_of()).status == FAIL


def test_cpu_affinity_is_na_where_nvml_cannot_say():
    check = proof.judge_affinity(IDLE, plan_of(GPU_SLOT))  # the recording answers Not Supported
    assert check.status == NA and "Not Supported" in check.reason
    rec = copy.deepcopy(IDLE)
    rec["devices"][0]["calls"]["nvmlDeviceGetCpuAffinity"] = {"value": [0b1110, 0, 0, 0]}
    assert proof.judge_affinity(rec, plan_of(GPU_SLOT)).status == OK
    assert proof.judge_affinity(rec, plan_of({**GPU_SLOT, "cpus": [0, 1]})).status == FAIL


def test_mig_disabled_unsupported_and_enabled():
    check = proof.judge_mig(IDLE, plan_of(GPU_SLOT))
    assert (check.status, check.reason) == (NA, "MIG disabled")
    rec = copy.deepcopy(IDLE)
    calls = rec["devices"][0]["calls"]
    calls["nvmlDeviceGetMigMode"] = {"error": 3, "error_name": "Not Supported"}
    assert proof.judge_mig(rec, plan_of(GPU_SLOT)).status == NA
    calls["nvmlDeviceGetMigMode"] = {"error": 999, "error_name": "Unknown Error"}
    assert proof.judge_mig(rec, plan_of(GPU_SLOT)).status == FAIL
    calls["nvmlDeviceGetMigMode"] = {"value": [1, 1]}
    migs = ["MIG-aaaa", "MIG-bbbb"]
    rec["devices"][0]["mig_devices"] = [{"index": i, "calls": {"nvmlDeviceGetUUID": {"value": m}}}
                                        for i, m in enumerate(migs)]
    mig_slots = [{**GPU_SLOT, "name": f"slot-{i + 1}", "gpus": [m]} for i, m in enumerate(migs)]
    assert proof.judge_mig(rec, plan_of(*mig_slots)).status == OK
    assert proof.judge_plan(rec, plan_of(*mig_slots)).status == OK
    assert proof.judge_mig(rec, plan_of(mig_slots[0])).status == FAIL


def test_the_workload_in_the_gpu_slot_must_see_exactly_its_gpu():
    assert proof.judge_cuda(job(probe()), UUID).status == OK
    assert proof.judge_torch(job(probe()), UUID).status == OK
    two = probe(cuda={"device_count": 2, "uuids": [UUID, "GPU-x"], "copy_ok": True})
    assert proof.judge_cuda(job(two), UUID).status == FAIL
    bad_copy = probe(cuda={"device_count": 1, "uuids": [UUID], "copy_ok": False})
    assert proof.judge_cuda(job(bad_copy), UUID).status == FAIL
    failed = probe(cuda={"error": "cuInit failed: CUDA_ERROR_NO_DEVICE (100)"})
    assert "CUDA_ERROR_NO_DEVICE" in proof.judge_cuda(job(failed), UUID).reason
    assert proof.judge_cuda(job(None, outcome="failed"), UUID).status == FAIL  # no report at all
    no_torch = probe(torch={"missing": "ModuleNotFoundError: No module named 'torch'"})
    assert proof.judge_torch(job(no_torch), UUID).status == NA
    other = probe(torch={**probe()["torch"], "uuid": "GPU-x"})
    assert proof.judge_torch(job(other), UUID).status == FAIL


def test_a_cpu_slot_must_see_no_gpu():
    nothing = probe(cuda={"error": "cuInit failed: CUDA_ERROR_NO_DEVICE (100)"},
                    torch={"version": "2.5.1", "cuda_available": False, "device_count": 0},
                    cuda_visible_devices="")
    cpu_job = job(nothing, slot="slot-0", slot_kind="cpu")
    assert proof.judge_cpu_slot(cpu_job).status == OK
    assert proof.judge_cpu_slot(job(probe(), slot="slot-0", slot_kind="cpu")).status == FAIL
    assert proof.judge_cpu_slot(job(nothing)).status == NA  # it ran in the GPU slot: not a CPU slot's test


def test_gpu_memory_matching():
    refused = {"key": "k2", "dead_reason": "no slot can run it: it asks 88GiB of GPU memory, the most a slot "
                                           "has is 79.6GiB", "asked_bytes": 88 * GiB}
    assert proof.judge_memory_matching(TOTAL, refused, job(probe())).status == OK
    assert proof.judge_memory_matching(TOTAL, {"key": "k2", "outcome": "success"}, job(probe())).status == FAIL
    assert proof.judge_memory_matching(TOTAL, refused, job(probe(), outcome="failed")).status == FAIL


def share_facts(hog_outcome="GPU memory over the slot's share", attributed=True, hog_start=105.0):
    good = job({"mode": "hold", "t_start": 104.0, "t_end": 129.0}, slot="slot-1")
    hog = job({}, slot="slot-2", outcome=hog_outcome, t_started=hog_start, finished=112.0)
    hog["probe"] = {"mode": "hold", "t_start": hog_start} if hog_start else {}
    return {"good": good, "hog": hog, "nvml_attributed": attributed, "nvml_processes_note": "empty process list"}


def test_a_shared_gpu_stops_the_job_over_its_share_or_says_why_it_cannot():
    assert proof.judge_share(share_facts()).status == OK
    late = share_facts(hog_start=140.0)  # started after the other ended: not at once
    late["hog"]["finished"] = 150.0
    assert proof.judge_share(late).status == FAIL
    check = proof.judge_share(share_facts(hog_outcome="success", attributed=False))
    assert check.status == NA and "does not attribute GPU memory" in check.reason
    assert proof.judge_share(share_facts(hog_outcome="success", attributed=True)).status == FAIL
    same = share_facts()
    same["hog"]["slot"] = "slot-1"
    assert proof.judge_share(same).status == FAIL


def scrape(util, used) -> str:
    labels = f'gpu="0",uuid="{UUID}",slot="slot-1"'
    return (f"# HELP appliance_gpu_utilization_ratio x\nappliance_gpu_utilization_ratio{{{labels}}} {util}\n"
            f"appliance_gpu_memory_used_bytes{{{labels}}} {used}\n"
            f"appliance_gpu_memory_total_bytes{{{labels}}} {float(TOTAL)}\n")


def test_metrics_must_carry_the_cards_real_use():
    idle = proof.answer(IDLE, "nvmlDeviceGetMemoryInfo")["used"]
    busy = proof.answer(RECORDED["busy"][0], "nvmlDeviceGetMemoryInfo")["used"]
    check = proof.judge_metrics([scrape(0.0, idle), scrape(0.97, busy)], idle, True, UUID)
    assert check.status == OK and check.figures["max_util"] == 0.97
    assert proof.judge_metrics([scrape(0.0, idle)] * 3, idle, True, UUID).status == FAIL
    assert proof.judge_metrics([scrape(0.0, busy)], idle, True, UUID).status == FAIL  # never busy
    assert proof.judge_metrics([scrape(0.0, busy)], idle, False, UUID).status == OK
    assert proof.judge_metrics(["# scrape failed: refused"], idle, True, UUID).status == FAIL


def test_timings_come_from_the_workload_and_the_job_report():
    check = proof.judge_timings(job(probe(), report={"wall_seconds": 31.2}))
    assert check.status == OK
    assert check.figures == {"enqueue_to_start_s": 3.5, "workload_s": 26.5, "job_wall_s": 31.2}
    assert proof.judge_timings(job(None)).status == FAIL


def test_the_fake_answers_the_appliances_calls_as_the_recorded_card_did(fake_nvml):
    """Turn the recording into a fake box, ask the fake the same questions: the same answers and
    error codes. A real card's recording that differs shows what the fake must learn."""
    for recorded in (IDLE, *RECORDED.get("busy", []), *RECORDED.get("shared", [])):
        fake_nvml(proof.fake_description(recorded))
        again = proof.record_nvml(pynvml)
        want, got = recorded["devices"][0]["calls"], again["devices"][0]["calls"]
        for call in want:
            if call == "nvmlDeviceGetProcessUtilization" and "value" in want[call]:
                assert [(s["pid"], s["smUtil"], s["memUtil"]) for s in got[call]["value"]] == \
                       [(s["pid"], s["smUtil"], s["memUtil"]) for s in want[call]["value"]]
                continue
            assert got[call] == want[call], call
        assert again["nvmlDeviceGetCount"] == recorded["nvmlDeviceGetCount"]


def test_a_recording_of_the_fake_turns_back_into_the_same_fake(fake_nvml):
    box = {"gpus": [shim.fake_gpu(0, cpus=[0, 1], memory_used=512 << 20, util=40, memory_util=10,
                                  mig={"enabled": True, "pending": 1, "max": 7,
                                       "devices": [{"index": 0, "uuid": "MIG-fake-a", "memory": 10 * GiB}]},
                                  processes=[{"pid": 7, "used_memory": GiB, "sm_util": 30, "mem_util": 5}]),
                    shim.fake_gpu(1, memory_used=0, util=0, memory_util=0,
                                  mig={"enabled": False, "pending": 0, "max": 7, "devices": []})], "fail": ""}
    fake_nvml(box)
    rec = proof.record_nvml(pynvml)
    assert proof.fake_description(rec) == box
    assert proof.error_of(rec, "nvmlDeviceGetCpuAffinity", 1) == "Not Supported"
    migs = rec["devices"][0]["mig_devices"]
    assert [m["calls"]["nvmlDeviceGetUUID"]["value"] for m in migs if "calls" in m] == ["MIG-fake-a"]
    assert {m["handle"]["error_name"] for m in migs if "handle" in m} == {"Not Found"}  # holes: indexes 1..6


def test_without_a_driver_nvml_is_recorded_as_the_error_it_gives(fake_nvml, tmp_path):
    rec = proof.record_nvml(pynvml)  # no description written: the fake says the library is missing
    assert rec["nvmlInit"]["error"] == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND and "devices" not in rec


@pytest.mark.skipif(not proof.driver_problem().startswith("no driver"),
                    reason="this box has an NVIDIA driver: run.sh would run the proof")
def test_run_sh_without_a_driver_says_so_in_one_line_and_succeeds(tmp_path):
    for cwd in (REPO, tmp_path):  # from the checkout, and from elsewhere
        p = subprocess.run([str(REPO / "tests" / "gpu" / "run.sh")], cwd=cwd, capture_output=True, text=True,
                           timeout=60)
        assert (p.returncode, p.stdout, p.stderr) == (0, proof.NO_DRIVER_LINE + "\n", "")


def test_the_workload_reports_what_it_sees_even_without_cuda():
    import workload
    assert workload.format_uuid(bytes(range(16))) == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    p = subprocess.run([sys.executable, "-I", str(REPO / "tests" / "gpu" / "workload.py"), "probe"],
                       capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    records = [json.loads(line[6:]) for line in p.stdout.splitlines() if line.startswith("PROOF ")]
    assert records[0]["event"] == "started" and records[-1]["mode"] == "probe"
    if proof.driver_problem().startswith("no driver"):
        assert "error" in records[-1]["cuda"]
        assert proof.judge_cpu_slot({**job(records[-1]), "slot": "slot-0", "slot_kind": "cpu"}).status == OK
