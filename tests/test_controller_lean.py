"""The controller carries only what it uses: after it checked the real store for /metrics and
asked supervisord for its programs, neither boto3 (~20 MB: store/client.py's quick check) nor
the supervisor package (~4 MB: supervisor.py's own unix-socket transport) is loaded, nor sqlite3
while no one asked for the job table."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.realparts import free_port
from tests.test_runner_lean import REPO

PROBE = """
import json, os, signal, sys, threading
from appliance import controller
threading.Timer(float(sys.argv[2]), lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
rc = controller.main(["--home", sys.argv[1]])
print(json.dumps({"rc": rc, "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"boto3", "botocore", "supervisor", "sqlite3"})}))
"""


def test_the_controller_checks_the_store_without_boto3_and_supervisord_without_its_package(store_home):
    port = free_port()
    with open(store_home.config_file, "a") as f:
        f.write(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    done = subprocess.run([sys.executable, "-c", PROBE, str(store_home.root), "4"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"rc": 0, "loaded": []}
    log = done.stderr
    assert f"metrics at http://127.0.0.1:{port}/metrics" in log
    assert "supervisord not answering" in log  # it asked (there is none here), through our transport
