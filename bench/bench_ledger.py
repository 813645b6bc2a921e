"""What the exactly-once ledger costs a job, next to the bookkeeping it replaced, in one run.

    sudo .venv/bin/python bench/bench_ledger.py [--jobs 60]

Starts the bundled SeaweedFS store the way tests/store_fixtures.py does; per job, best run last:
  baseline  the old bookkeeping: read the result record in the client's bucket, write it
            "ended", write it "done" (1 GET + 2 PUT)
  ledger    Ledger.look (this box's record, the store ledger's), then running, ended, settled
            (each on this box and in the appliance-ledger bucket), plus the users' copy once done
Median and p90 per job, the first 10 jobs (warm-up) left out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.paths import Home  # noqa: E402
from appliance.runner import ledger  # noqa: E402
from appliance.runner.ledger_stores import LocalLedger, StoreLedger  # noqa: E402
from appliance.studioml import transfer  # noqa: E402
from appliance.studioml.artifacts import result_record  # noqa: E402
from appliance.studioml.request import parse_request  # noqa: E402
from appliance.studioml.transfer import RetryPolicy  # noqa: E402
from tests.store_fixtures import start_store, stop_store  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--jobs", type=int, default=60)
args = ap.parse_args()
root = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
store = start_store(root / "store")
try:
    from appliance.store.client import ensure_bucket
    ensure_bucket(store.endpoint_url, store.access_key, store.secret_key, store.bucket)
    body = json.loads((ROOT / "tests" / "fixtures" / "studioml-request.json").read_text())
    for a in body["experiment"]["artifacts"].values():
        a["qualified"] = a["qualified"].replace("127.0.0.1:5000", store.endpoint_url.split("://")[1])
        a["bucket"] = store.bucket
        a["credentials"]["aws"].update(access_key=store.access_key, secret_access_key=store.secret_key)
    retry = RetryPolicy(attempts=2, first_delay_s=0.01)
    led = ledger.Ledger(LocalLedger(root / "home" / "ledger"),
                        StoreLedger(store.endpoint_url, store.access_key, store.secret_key), me="bench")
    ended = {"outcome": "success", "class": "success", "exit_code": 0, "reason": "", "finished": time.time()}
    old, new = [], []
    for i in range(args.jobs):
        body["experiment"]["key"] = f"bench-{i}"
        req = parse_request(json.dumps(body))
        art = result_record(req.artifacts)
        t = time.perf_counter()  # old: read the client record, write ended, write done
        transfer.read_record(art, retry)
        transfer.write_record(art, {**ended, "state": "ended"}, retry)
        transfer.write_record(art, {**ended, "state": "done"}, retry)
        old.append(time.perf_counter() - t)
        body["experiment"]["key"] = f"bench-new-{i}"
        req = parse_request(json.dumps(body))
        art = result_record(req.artifacts)
        t = time.perf_counter()  # new: ledger look, running, ended, settled, plus the users' copy once done
        led.look(Home.at(root / "home"), req, 1800)
        e = led.running(req, "slot-0", 1, None)
        e = led.ended(e, ended)
        led.settled(e, ended)
        transfer.write_record(art, {**ended, "state": "done"}, retry)
        new.append(time.perf_counter() - t)
    for name, xs in (("baseline (client-bucket record)", old[10:]), ("ledger (+ users' copy)", new[10:])):
        print(f"{name}: median {statistics.median(xs)*1000:.1f} ms per job, p90 {sorted(xs)[int(len(xs)*.9)]*1000:.1f} ms")
finally:
    stop_store(store)
    shutil.rmtree(root, ignore_errors=True)
