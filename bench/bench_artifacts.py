"""Artifact transfer speed through the runner's code against raw boto3, to the same store.

    sudo .venv/bin/python bench/bench_artifacts.py [--sizes 64,1024] [--repeat 2]

Starts the bundled SeaweedFS store the way tests/store_fixtures.py does, writes a directory
holding one file of each size (MiB, incompressible), then per size and best of --repeat:
  upload    runner: transfer.upload (the tar stream of the directory, PackedStream into
            upload_fileobj, multipart in parallel)  vs  raw: client.upload_file of the file
  download  runner: transfer.download of that tar  vs  raw: client.download_file
and the runner's fetch (download + safe unpack) for reference. Ratios are raw time / runner
time (aim >= 0.8); peak RSS growth over the process's RSS before the transfer is sampled
every 10 ms (aim < 64 MiB for the runner's 1 GiB upload).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.studioml import transfer as arts  # noqa: E402
from appliance.studioml.transfer import RetryPolicy  # noqa: E402
from appliance.studioml.request import Artifact  # noqa: E402
from tests.store_fixtures import start_store  # noqa: E402

MiB = 1 << 20


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def measured(fn) -> tuple[float, int]:
    """(seconds, peak RSS growth in bytes) of fn()."""
    base, peak, stop = rss(), [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    t = threading.Thread(target=watch)
    t.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        elapsed = time.perf_counter() - t0
        stop.set()
        t.join()
    return elapsed, max(peak[0], rss()) - base


def best(runs):
    return min(r[0] for r in runs), max(r[1] for r in runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,1024", help="file sizes in MiB")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="appliance-bench-art-"))
    store = start_store(base / "store-home")
    client = store.client()
    retry = RetryPolicy(attempts=1)
    try:
        print(f"store {store.endpoint_url} (bundled SeaweedFS, one host, {os.cpu_count()} CPUs); "
              f"runner: parts of {arts.PART_BYTES // MiB} MiB, {arts.PARALLEL_PARTS} in flight, "
              f"{arts.UPLOAD_PARTS_IN_MEMORY} in memory for an upload")
        for size in (int(s) for s in args.sizes.split(",")):
            src = base / f"out{size}"
            src.mkdir()
            block = os.urandom(MiB)
            with open(src / "data.bin", "wb") as f:
                for _ in range(size):
                    f.write(block)
            art = Artifact(name="output", key=f"experiments/bench/{size}.tar", bucket=store.bucket,
                           endpoint_url=store.endpoint_url, mutable=True, unpack=True,
                           access_key=store.access_key, secret_key=store.secret_key, region="us-east-1",
                           session_token=None)
            raw_key = f"raw/{size}.bin"
            got = base / "got"
            up_raw, up_run, down_raw, down_run, fetch = [], [], [], [], []
            for _ in range(args.repeat):
                up_raw.append(measured(lambda: client.upload_file(str(src / "data.bin"), store.bucket, raw_key)))
                up_run.append(measured(lambda: arts.upload(art, src, retry)))
                down_raw.append(measured(lambda: client.download_file(store.bucket, raw_key, str(got))))
                got.unlink()
                down_run.append(measured(lambda: arts.download(art, got, retry)))
                got.unlink()
                dest = base / "fetched"
                fetch.append(measured(lambda: arts.fetch(art, dest / "output", None, retry, 4 << 30)))
                shutil.rmtree(dest)
            for what, raw, run in (("upload", up_raw, up_run), ("download", down_raw, down_run)):
                (t_raw, m_raw), (t_run, m_run) = best(raw), best(run)
                print(f"{size:5d} MiB {what:<8}  runner {size / t_run:7.1f} MiB/s ({t_run:6.2f} s, peak RSS "
                      f"+{m_run / MiB:5.1f} MiB)   raw boto3 {size / t_raw:7.1f} MiB/s ({t_raw:6.2f} s, "
                      f"+{m_raw / MiB:5.1f} MiB)   ratio {t_raw / t_run:.2f}  (aim >= 0.8)")
            t_f, m_f = best(fetch)
            print(f"{size:5d} MiB fetch     runner download + safe unpack {size / t_f:7.1f} MiB/s ({t_f:6.2f} s, "
                  f"+{m_f / MiB:5.1f} MiB)")
            shutil.rmtree(src)
    finally:
        store.process.terminate()
        store.process.wait(10)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
