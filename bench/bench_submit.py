"""How long `appliance submit` of a small folder takes, next to `aws s3 cp` of the same tar.

    sudo .venv/bin/python bench/bench_submit.py [--n 30] [--parallel 1] [--src DIR]

It starts a throwaway SeaweedFS store (all a submit needs besides the home), then times N
`appliance submit` processes of a small folder (a dozen files, ~30 KiB), each a new process as a
user would run it, in three ways:
  - changed:   a file changes before every submit, so every submit uploads its workspace
  - unchanged: the same folder again, so the store already holds it (one HEAD, no upload)
  - freeze:    changed, without --no-freeze (it also reads the interpreter's package list;
               `--python` is this interpreter, as in an active virtualenv)
and, as the baseline, N `aws s3 cp` of the same tar to the same store (a `python -c` boto3
one-shot when the aws CLI is not installed; the output says which). It prints the median and
p90 of each and their ratio to the baseline's median.

`--parallel 4` runs four at a time, as a queue-filling script would. `--src DIR` times the
appliance found in DIR (e.g. an older checkout from `git worktree add`) instead of this one.
The subprocesses may write .pyc files, as an installed appliance has them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.paths import Home  # noqa: E402
from appliance.workspace import pack_directory  # noqa: E402
from tests.store_fixtures import start_store, stop_store  # noqa: E402

BOTO3_CP = """
import sys, boto3
from botocore.config import Config
boto3.client("s3", endpoint_url=sys.argv[1], config=Config(s3={"addressing_style": "path"})
             ).upload_file(sys.argv[2], sys.argv[3], sys.argv[4])
"""


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def timed(argv, env) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    took = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])}... failed:\n{result.stdout}\n{result.stderr}")
    return took


def series(n: int, parallel: int, make_argv, env) -> list:
    """Times of n runs, `parallel` at a time; make_argv(i) gives the i-th command."""
    timed(make_argv(-1), env)  # warm the page cache and the .pyc files
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda i: timed(make_argv(i), env), range(n)))


def small_folder(path: Path) -> None:
    path.mkdir()
    (path / "train.py").write_text("import sys\nprint('hello', sys.argv[1:])\n")
    (path / "pkg").mkdir()
    (path / "pkg" / "__init__.py").write_text("")
    for i in range(10):
        (path / "pkg" / f"mod{i}.py").write_text(f"# module {i}\n" + "X = 1\n" * 500)
    (path / "changes.txt").write_text("")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=30, help="submits per series (default 30)")
    ap.add_argument("--parallel", type=int, default=1, help="submits at a time (default 1)")
    ap.add_argument("--src", help="time the appliance in this source folder instead")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    store = None
    try:
        store = start_store(base / "store-home")
        home = Home.at(base / "home")
        home.ensure()
        shutil.copy(store.home.store_credentials, home.store_credentials)
        port = store.endpoint_url.rsplit(":", 1)[1]
        home.config_file.write_text(f'[object_store]\nport = {port}\nbucket = "{store.bucket}"\n')
        ws = base / "ws"
        small_folder(ws)
        tar, _sha = pack_directory(ws, out_dir=base)

        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        if args.src:
            env["PYTHONPATH"] = str(Path(args.src).resolve())
        where = subprocess.run([sys.executable, "-c", "import appliance; print(appliance.__file__)"],
                               env=env, capture_output=True, text=True, check=True,
                               cwd=tempfile.gettempdir()).stdout.strip()
        submit = [sys.executable, "-m", "appliance", "--home", str(home.root), "submit",
                  "--dir", str(ws)]

        def changed(extra):
            def argv(i):
                (ws / "changes.txt").write_text(uuid.uuid4().hex)  # a new workspace each time
                return submit + extra + ["train.py"]
            return argv

        results = {
            "submit, changed folder": series(args.n, args.parallel, changed(["--no-freeze"]), env),
            "submit, unchanged folder": series(args.n, args.parallel,
                                               lambda i: submit + ["--no-freeze", "train.py"], env),
            "submit + package list": series(args.n, args.parallel,
                                            changed(["--python", sys.executable, "--freeze"]), env),
            "submit + project env": series(args.n, args.parallel,
                                           changed(["--python", sys.executable]), env),
        }
        aws_env = {**env, "AWS_ACCESS_KEY_ID": store.access_key,
                   "AWS_SECRET_ACCESS_KEY": store.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}
        aws = shutil.which("aws")
        if aws:
            baseline = "aws s3 cp"
            cp = lambda i: [aws, "s3", "cp", "--quiet", "--endpoint-url", store.endpoint_url,  # noqa: E731
                            str(tar), f"s3://{store.bucket}/bench/{i}.tar"]
        else:
            baseline = "boto3 upload_file (python -c; no aws CLI here)"
            cp = lambda i: [sys.executable, "-c", BOTO3_CP, store.endpoint_url, str(tar),  # noqa: E731
                            store.bucket, f"bench/{i}.tar"]
        results[baseline] = series(args.n, args.parallel, cp, aws_env)

        ref = statistics.median(results[baseline])
        print(f"appliance from {Path(where).parent}; {args.n} runs per series, {args.parallel} at a "
              f"time; workspace tar {tar.stat().st_size / 1024:.0f} KiB")
        print(f"{'':48} {'median':>8} {'p90':>8} {'median / baseline':>18}")
        for name, times in results.items():
            med = statistics.median(times)
            print(f"{name:48} {med * 1000:6.0f}ms {percentile(times, 90) * 1000:6.0f}ms "
                  f"{med / ref:17.2f}x")
        return 0
    finally:
        if store is not None:
            stop_store(store)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
