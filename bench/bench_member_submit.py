"""What going through the API costs a submit: a member's `appliance submit` next to root's.

    sudo .venv/bin/python bench/bench_member_submit.py [--n 20]

It starts a throwaway SeaweedFS store and the API daemon (appliance/api/server.py, in this
process) on a temporary home, makes a throwaway account in the `appliance` group, and times N
`appliance submit --no-freeze` processes of a small changed folder (each a new process, as a
user runs it) two ways in the same run:
  - root (the baseline): the client identity from HOME/secrets, the queue written directly;
  - member: `runuser -u ACCOUNT`: its own key from GET /v1/me/store, the request through
    POST /v1/submit (the API checks it and writes the queue file as the member's).
The member's identity is made before the store starts (a first use would also make it and wait
for the store to take it). It prints the median and p90 of each, and the member's over root's.
The account is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.api.server import serve  # noqa: E402
from appliance.paths import SHARED_GROUP, Home  # noqa: E402
from appliance.store.credentials import ensure_member  # noqa: E402
from tests.store_fixtures import start_store, stop_store  # noqa: E402


RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"


def _time(argv: list[str], env: dict, cwd: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])}... failed: {done.stderr.strip()}")
    return took


def _summary(name: str, times: list[float]) -> str:
    times = sorted(times)
    p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
    return f"{name:8} median {statistics.median(times) * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (it makes an account and runs the CLI as it)")
    subprocess.run(["groupadd", "--force", "--system", SHARED_GROUP], check=True)
    base = Path(tempfile.mkdtemp(prefix="bench-member-"))
    os.chmod(base, 0o755)
    name = f"bm{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--create-home", "--home-dir", str(base / name), "--user-group",
                    "--groups", SHARED_GROUP, name], check=True)
    import pwd

    uid = pwd.getpwnam(name).pw_uid
    home = Home.at(base / "home")
    home.ensure()
    os.chmod(home.root, 0o755)
    store = None
    server = None
    try:
        from appliance.store.credentials import ensure_credentials

        ensure_credentials(home, with_client=True)
        ensure_member(home, uid, name)
        store = start_store(home.root)  # writes the identities (members' included) and starts the store
        port = store.endpoint_url.rsplit(":", 1)[1]
        home.config_file.write_text(f"[object_store]\nport = {port}\n")
        from appliance.api.members import member_store
        from appliance.config import load_config

        member = member_store(home, load_config(home.config_file), uid, name)  # its bucket, made now
        server = serve(home)
        threading.Thread(target=server.serve_forever, daemon=True).start()

        folders = {}
        for who in ("root", "member"):
            ws = base / name / f"ws-{who}"
            ws.mkdir()
            for i in range(12):
                (ws / f"f{i}.py").write_text("x = 1\n" * 200)
            (ws / "train.py").write_text("print('hi')\n")
            folders[who] = ws
        subprocess.run(["chown", "-R", name, str(base / name)], check=True)
        cli = [sys.executable, "-m", "appliance", "--home", str(home.root), "submit", "--no-freeze",
               "--ram", "256mb"]
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(base / name), "LANG": "C.UTF-8"}
        times = {"root": [], "member": []}
        for i in range(args.n):
            for who in ("root", "member"):
                ws = folders[who]
                (ws / "changed.txt").write_text(f"{who} {i} {uuid.uuid4()}\n")
                argv = cli + ["--dir", str(ws), "train.py"]
                if who == "member":
                    argv = [RUNUSER, "-u", name, "--", "env", *[f"{k}={v}" for k, v in env.items()], *argv]
                times[who].append(_time(argv, {**os.environ, **env} if who == "root" else env, str(ws)))
        print(f"{args.n} submits each of a small changed folder; member bucket {member.bucket}")
        for who in ("root", "member"):
            print(_summary(who, times[who]))
        print(f"member / root (medians): {statistics.median(times['member']) / statistics.median(times['root']):.2f}x")
    finally:
        if server is not None:
            server.shutdown()
        if store is not None:
            stop_store(store)
        subprocess.run(["userdel", "--force", "--remove", name], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
