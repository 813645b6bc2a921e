"""appliance submit: pack this folder, upload it to the appliance's store, queue SCRIPT.

What lands on the queue is a StudioML request of the same shape the `studioml` client writes
(tests/fixtures/studioml-request.json), so runners treat both alike. Default queue:
`local_appliance` (a `local*` name, so it is the directory queue under the home's
studioml/queue folder; a StudioML user reaches the same queue with
`STUDIOML_HOME=<home>/studioml studio run --queue local_appliance ...`).

A submit of a small folder takes ~0.1 s (bench/bench_submit.py): a small workspace goes with
two plain signed HTTP requests (boto3 alone would cost ~0.2 s to import and set up), the
interpreter's package list is read (importlib.metadata, not `pip freeze`) while the workspace
is packed and sent, and a workspace the store already holds (same tree, same sha256, same
`blobstore/<sha256>.tar` key) costs one HEAD and no upload.
"""

from __future__ import annotations

import argparse
import getpass
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from appliance.api.submit_client import enqueue_request, submit_store
from appliance.jobs.control import JobError
from appliance.jobs.intake import ARRAY_BASE, ARRAY_INDEX, ARRAY_LIMIT
from appliance.jobs.policy import SpecError, array_plan, member_key
from appliance.queues.local import is_local_queue, no_access
from appliance.studioml.request import BadRequest, parse_duration, parse_request, parse_size
from appliance.store import sigv4
from appliance.workspace import pack_directory, workspace_key

DEFAULT_QUEUE = "local_appliance"
MUTABLE_ARTIFACTS = ("modeldir", "retval", "output", "tb", "_metrics", "_metadata")
SINGLE_PUT_MAX = 64 * 2**20  # larger workspaces go with boto3, in parallel parts

# What `pip freeze --all` prints, read with importlib.metadata in `--python`'s interpreter:
# one short process instead of pip's ~0.5 s. Exit 3 (no importlib.metadata: Python < 3.8)
# falls back to pip itself.
FREEZE_SCRIPT = r"""
import json, os, sys
try:
    from importlib import metadata
except ImportError:
    sys.exit(3)
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
seen, lines = set(), []
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    key = (name or "").lower().replace("_", "-").replace(".", "-")
    if not key or key in seen:
        continue
    seen.add(key)
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        direct = {}
    url, vcs = direct.get("url"), direct.get("vcs_info")
    if (direct.get("dir_info") or {}).get("editable"):
        line = "-e " + url
    elif vcs:
        line = "%s @ %s+%s@%s" % (name, vcs.get("vcs"), url, vcs.get("commit_id"))
    elif url:
        line = "%s @ %s" % (name, url)
    else:
        line = "%s==%s" % (name, dist.version)
    lines.append((key, line))
print(json.dumps({"version": "%d.%d" % sys.version_info[:2], "lines": [x for _, x in sorted(lines)]}))
"""


def register(sub):
    p = sub.add_parser(
        "submit", help="pack this folder and queue `python SCRIPT ARGS...` to run in a slot",
        description="Pack the current folder (without .git, __pycache__, .venv), upload it to "
                    "the appliance's object store and queue a StudioML experiment request. "
                    "Prints the experiment key.")
    p.add_argument("--queue", default=DEFAULT_QUEUE,
                   help=f"local queue to put it on (default: {DEFAULT_QUEUE})")
    p.add_argument("--dir", default=".", help="folder to pack (default: the current one)")
    p.add_argument("--cpus", default=1, type=int, help="cpus it needs (default: 1)")
    p.add_argument("--ram", default="2gb", help="memory it needs (default: 2gb; gb = GiB)")
    p.add_argument("--hdd", default="", help="disk it needs, e.g. 3gb (default: none asked; a request never "
                                             "runs on a box whose disk is smaller)")
    p.add_argument("--gpus", default=0, type=int, help="gpus it needs (default: 0)")
    p.add_argument("--gpu-mem", default="0gb", help="memory per gpu it needs (default: 0gb)")
    p.add_argument("--lifetime", help="drop it if not finished this long after submission "
                                      "(e.g. 30m; default: the runner's)")
    p.add_argument("--max-duration", help="stop it after running this long (e.g. 1h)")
    p.add_argument("--save-every", default="3m",
                   help="upload its outputs this often while it runs (default: 3m)")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="environment variable for the experiment; repeatable; %%VAR%% expands "
                        "from the runner's environment")
    p.add_argument("--pip", action="append", default=[], metavar="PKG",
                   help="extra package to install; repeatable")
    p.add_argument("--python", default="python3",
                   help="interpreter whose `pip freeze` and version the runner reproduces "
                        "(default: python3 on PATH, i.e. your active virtualenv)")
    p.add_argument("--no-freeze", action="store_true",
                   help="send no pip freeze: the runner installs only --pip packages")
    p.add_argument("--array", metavar="SPEC",
                   help="queue one job per index, e.g. 0-99 or 0-99%%4 (at most 4 run at once), 1,3,5, "
                        "0-20:5; each gets APPLIANCE_ARRAY_INDEX in its environment and the key "
                        "BASE-<index>; the base key, printed last, names them all (like sbatch --array)")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                   help="one job per combination of the swept values (the cross product of every "
                        "--sweep), NAME=value in each job's environment; repeatable; with --array "
                        "%%N at most N run at once")
    p.add_argument("script", help="Python file to run, relative to the packed folder")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    p.set_defaults(func=run)


def _fail(msg: str) -> int:
    print(f"appliance submit: {msg}", file=sys.stderr)
    return 2


def start_freeze(python: str) -> subprocess.Popen:
    """Start reading `python`'s packages; `finish_freeze` collects them. OSError if it cannot run."""
    return subprocess.Popen([python, "-c", FREEZE_SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def finish_freeze(proc: subprocess.Popen, python: str) -> tuple:
    """(pythonenv lines, "3.11", [skipped lines]) of `python`, as the StudioML client sends.
    CalledProcessError if the interpreter failed."""
    out, err = proc.communicate()
    if proc.returncode == 3:
        return _pip_freeze(python)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, python, out, err)
    data = json.loads(out)
    keep, skipped = _keep_portable(data["lines"])
    return keep, data["version"], skipped


def freeze(python: str) -> tuple:
    """(pythonenv lines, "3.11", [skipped lines]) of `python`, waiting for them."""
    return finish_freeze(start_freeze(python), python)


def _pip_freeze(python: str) -> tuple:
    ver = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    out = subprocess.run([python, "-m", "pip", "freeze", "--all"],
                         capture_output=True, text=True, check=True).stdout
    keep, skipped = _keep_portable(out.splitlines())
    return keep, ver, skipped


def _keep_portable(lines) -> tuple:
    """(lines to send, lines that only make sense on this machine)."""
    keep, skipped = [], []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # editable installs and local paths only exist on this machine
        if line.startswith("-e ") or " @ file:" in line:
            skipped.append(line)
        else:
            keep.append(line)
    return keep, skipped


def build_request(*, key: str, script: str, script_args: list, workspace_key: str,
                  workspace_dir: str, endpoint: str, bucket: str, access_key: str,
                  secret_key: str, region: str, resources: dict, max_duration, lifetime,
                  save_every, env: dict, pip: list, pythonenv: list, pythonver,
                  studioml_home: Path, now: float) -> dict:
    """The request body as the studioml client writes it (all default artifacts)."""
    host = urlsplit(endpoint).netloc
    creds = {"aws": {"access_key": access_key, "secret_access_key": secret_key,
                     "region": region}}

    def artifact(art_key: str, mutable: bool, local: str) -> dict:
        return {"unpack": True, "mutable": mutable, "key": art_key, "local": local,
                "qualified": f"s3://{host}/{bucket}/{art_key}", "bucket": bucket,
                "credentials": creds}

    artifacts = {"workspace": artifact(workspace_key, False, workspace_dir)}
    for tag in MUTABLE_ARTIFACTS:
        artifacts[tag] = artifact(f"experiments/{key}/{tag}.tar", True,
                                  str(studioml_home / "experiments" / key / tag))
    storage = {"type": "s3", "endpoint": endpoint, "bucket": bucket, "credentials": creds}
    return {
        "experiment": {
            "key": key, "args": list(script_args), "filename": script,
            "pythonenv": list(pythonenv), "project": None, "pythonver": pythonver,
            "resources_needed": resources, "status": "waiting", "time_added": now,
            "time_started": None, "time_last_checkpoint": now, "time_finished": None,
            "info": {}, "git": None, "metric": None, "max_duration": max_duration,
            "owner": _owner(), "from_compl_service": False, "artifacts": artifacts,
        },
        "config": {
            "database": {**storage, "authentication": "none"},
            "storage": storage,
            "cloud": {"queue": {}},
            "saveWorkspaceFrequency": save_every,
            "experimentLifetime": lifetime,
            "verbose": "info",
            "resources_needed": resources,
            "env": env,
            "pip": list(pip),
        },
    }


def _owner() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in a bare container
        return "guest"


def run(args) -> int:
    home = args.home
    if not is_local_queue(args.queue):
        return _fail(f"--queue {args.queue!r}: only local queues (names starting with 'local') "
                     "can be submitted to from here")
    workdir = Path(args.dir).resolve()
    if not workdir.is_dir():
        return _fail(f"--dir {args.dir}: not a folder")
    script = Path(args.script)
    if script.is_absolute() or ".." in script.parts or not (workdir / script).is_file():
        return _fail(f"{args.script}: no such file inside {workdir} (give a path relative to it)")

    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            return _fail(f"--env {item!r}: write NAME=VALUE")
        env[name] = value
    try:
        resources = {"cpus": args.cpus, "gpus": args.gpus, "ram": args.ram, "hdd": args.hdd,
                     "gpuMem": args.gpu_mem}
        for flag, value in (("--ram", args.ram), ("--hdd", args.hdd),
                            ("--gpu-mem", args.gpu_mem)):
            if value:
                parse_size(value, flag)
        for flag, value in (("--lifetime", args.lifetime), ("--max-duration", args.max_duration),
                            ("--save-every", args.save_every)):
            parse_duration(value, flag)
    except BadRequest as e:
        return _fail(str(e))
    try:
        array = array_plan(args.array, args.sweep)
    except SpecError as e:
        return _fail(str(e))

    if not args.no_freeze and not shutil.which(args.python):
        return _fail(_freeze_problem(args.python, "not found"))

    creds = submit_store(home)  # the caller's own identity; it travels in the message: never the admin's
    endpoint, bucket, region = creds.endpoint, creds.bucket, creds.region

    key = f"{int(time.time())}_{uuid.uuid4().hex[:12]}"

    pythonenv, pythonver = [], f"{sys.version_info[0]}.{sys.version_info[1]}"
    freezing = None
    if not args.no_freeze:
        try:
            freezing = start_freeze(args.python)  # runs while the workspace is packed and sent
        except OSError as e:
            return _fail(_freeze_problem(args.python, e))
    try:
        ws_key, size = send_workspace(workdir, endpoint, creds.access_key, creds.secret_key,
                                      bucket, region)
        if freezing:
            try:
                pythonenv, pythonver, skipped = finish_freeze(freezing, args.python)
            except (OSError, subprocess.CalledProcessError, ValueError) as e:
                return _fail(_freeze_problem(args.python, e))
            for line in skipped:
                print(f"appliance submit: not sent (only exists here): {line}", file=sys.stderr)
    except StoreProblem as e:
        return _fail(str(e))
    finally:
        if freezing and freezing.returncode is None:
            freezing.kill()
            freezing.communicate()

    base = key
    members = [(key, env)] if array is None else [
        (member_key(base, i), {**env, **extra, ARRAY_BASE: base, ARRAY_INDEX: str(i),
                               **({ARRAY_LIMIT: str(array[1])} if array[1] else {})})
        for i, extra in array[0]]
    for member, member_env in members:
        body = build_request(
            key=member, script=script.as_posix(), script_args=args.script_args, workspace_key=ws_key,
            workspace_dir=str(workdir), endpoint=endpoint, bucket=bucket,
            access_key=creds.access_key, secret_key=creds.secret_key, region=region,
            resources=resources, max_duration=args.max_duration, lifetime=args.lifetime,
            save_every=args.save_every, env=member_env, pip=args.pip, pythonenv=pythonenv,
            pythonver=pythonver, studioml_home=home.studioml_home, now=time.time())
        data = json.dumps(body).encode()
        parse_request(data)  # what a runner will accept; a failure here is our bug
        try:
            enqueue_request(home, args.queue, data)
        except PermissionError:
            return _fail(no_access(home.queue_root))
        except OSError as e:  # a full disk (QueueWriteError's one line), a lock held too long
            return _fail(str(e))
        except JobError as e:  # the key is a job already (root's path; a member's says it through the API)
            return _fail(e.message)
    if array is None:
        print(f"queued {key} on {args.queue} (workspace {size / 2**20:.1f} MiB)", file=sys.stderr)
    else:
        for member, _ in members:
            print(member)
        bound = f", at most {array[1]} at once" if array[1] else ""
        print(f"queued {len(members)} jobs {members[0][0]} .. {members[-1][0]} on {args.queue}{bound} "
              f"(workspace {size / 2**20:.1f} MiB); wait for all: appliance wait {base}", file=sys.stderr)
    print(key)
    return 0


class StoreProblem(RuntimeError):
    """The workspace could not be sent; the message says why and what to do."""


def _freeze_problem(python: str, why) -> str:
    return (f"--python {python}: cannot read its packages ({why}); "
            "use --no-freeze with --pip, or point --python at your interpreter")


def send_workspace(workdir: Path, endpoint: str, access_key: str, secret_key: str, bucket: str,
                   region: str) -> tuple:
    """Pack `workdir` and put it at `blobstore/<sha256>.tar` unless the store holds it already
    (same tree, same hash): one HEAD, then at most one upload. Returns (key, tar size).

    A small workspace goes with two plain HTTP requests (appliance.store.sigv4); boto3 takes
    over for a large one, and for anything the quick path did not expect (it retries, and
    its errors say what is wrong)."""
    def skipped_entry(rel, why):
        print(f"appliance submit: left out {rel}: {why}", file=sys.stderr)

    tar, sha = pack_directory(workdir, on_skip=skipped_entry)
    try:
        ws_key, size = workspace_key(sha), tar.stat().st_size
        if size <= SINGLE_PUT_MAX:
            try:
                if not sigv4.exists(endpoint, access_key, secret_key, region, bucket, ws_key):
                    sigv4.put_file(endpoint, access_key, secret_key, region, bucket, ws_key, tar, sha)
                return ws_key, size
            except sigv4.Unexpected:
                pass
        _send_with_boto3(tar, ws_key, endpoint, access_key, secret_key, bucket, region)
        return ws_key, size
    finally:
        tar.unlink(missing_ok=True)


def _send_with_boto3(tar: Path, ws_key: str, endpoint: str, access_key: str, secret_key: str,
                     bucket: str, region: str) -> None:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    from appliance.store.client import check_store, s3_client

    client = s3_client(endpoint, access_key, secret_key, region)
    try:
        if not _exists(client, bucket, ws_key):
            client.upload_file(str(tar), bucket, ws_key)  # in parallel parts when large
    except (BotoCoreError, ClientError, S3UploadFailedError) as e:
        # say what is wrong with the store, if something is (it costs a request only now)
        raise StoreProblem(check_store(endpoint, access_key, secret_key, bucket, region)
                           or f"cannot upload the workspace to {endpoint}/{bucket}: {e}") from None


def _exists(client, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise
