"""appliance submit: pack this folder, upload it to the appliance's store, queue SCRIPT.

What lands on the queue is a StudioML request of the same shape the `studioml` client writes
(tests/fixtures/studioml-request.json), so runners treat both alike. Default queue:
`local_appliance` (a `local*` name, so it is the directory queue under the home's
studioml/queue folder; a StudioML user reaches the same queue with
`STUDIOML_HOME=<home>/studioml studio run --queue local_appliance ...`).

What is packed, with which environment, and what is refused before anything is sent is
decided in appliance/submit_checks.py (the project's own environment: appliance/studioml/environment.py;
ignore files: appliance/ignore.py); the upload is appliance/workspace_upload.py.

A submit of a small folder takes ~70 ms, most of it the interpreter and its imports
(bench/compare.py, bench/bench_submit.py), so a plain submit imports only what it uses: a
small workspace goes with two plain signed HTTP requests (appliance/store/sigv4.py,
appliance/http1.py: boto3 alone would cost ~0.2 s to import and set up, http.client ~10 ms),
root's submit finds the store's place without the config schema (api/submit_client.py), and
the process ends without the interpreter's teardown (cli.command). With
`--freeze` the interpreter's package list is read (importlib.metadata, not `pip freeze`) while
the workspace is packed and sent, and a workspace the store already holds (same tree, same
sha256, same `blobstore/<sha256>.tar` key) costs one HEAD and no upload; a folder unchanged
since it was last sent (sizes and mtimes) is not even packed again.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from appliance.api.submit_client import QueueRefused, enqueue_request, submit_store
from appliance.queues.local_layout import is_local_queue, no_access
from appliance.studioml.request import BadRequest, parse_duration, parse_request, parse_size
from appliance.submit_checks import SubmitRefused, pack_plan
from appliance.workspace_upload import StoreProblem, send_workspace

# A plain submit imports no more than it needs (it is timed: bench/compare.py): what only
# --freeze, --array or --sweep use is imported where they are used.

DEFAULT_QUEUE = "local_appliance"
MUTABLE_ARTIFACTS = ("modeldir", "retval", "output", "tb", "_metrics", "_metadata")

def register(sub):
    p = sub.add_parser(
        "submit", help="pack this folder and queue `python SCRIPT ARGS...` to run in a slot",
        description="Pack the current folder (without .git, __pycache__, .venv and what "
                    ".applianceignore and .gitignore files name), upload it to the appliance's "
                    "object store and queue a StudioML experiment request. The environment is "
                    "the project's own: uv.lock, else pyproject.toml's dependencies, else "
                    "requirements.txt, else the installed packages its files import. "
                    "Prints the experiment key.")
    p.add_argument("--queue", default=DEFAULT_QUEUE,
                   help=f"local queue to put it on (default: {DEFAULT_QUEUE})")
    p.add_argument("--dir", default=".", help="folder to pack (default: the current one)")
    p.add_argument("--cpus", default=1, type=int, help="cpus it needs (default: 1)")
    p.add_argument("--ram", default="", help="the job's memory limit, like Slurm's --mem, e.g. 4gb (gb = GiB; "
                                             "default: the slot's limit)")
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
                   help="interpreter whose version the runner reproduces, and whose installed "
                        "packages give the versions of what the files import (default: python3 "
                        "on PATH, i.e. your active virtualenv)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--freeze", action="store_true",
                   help="send --python's whole `pip freeze` instead of the project's own "
                        "environment (uv.lock, pyproject.toml, requirements.txt or its imports)")
    which.add_argument("--no-freeze", action="store_true",
                   help="send no environment: the runner installs only --pip packages")
    p.add_argument("--no-gitignore", action="store_true",
                   help="send what .gitignore files leave out (.applianceignore still counts)")
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
    # it makes no cgroup (cli.py need not find them) and closes every file it writes (so
    # cli.command may end the process without the interpreter's teardown)
    p.set_defaults(func=run, cgroups=False, quick_exit=True)


def _fail(msg: str) -> int:
    print(f"appliance submit: {msg}", file=sys.stderr)
    return 2


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
    array = None
    if args.array is not None or args.sweep:
        from appliance.jobs.policy import SpecError, array_plan

        try:
            array = array_plan(args.array, args.sweep)
        except SpecError as e:
            return _fail(str(e))

    if not shutil.which(args.python) and not args.no_freeze:
        return _fail(_freeze_problem(args.python, "not found"))
    try:
        packing = pack_plan(home, args, workdir, script, resources)
    except SubmitRefused as e:
        return _fail(str(e))

    creds = submit_store(home)  # the caller's own identity; it travels in the message: never the admin's
    endpoint, bucket, region = creds.endpoint, creds.bucket, creds.region

    key = f"{int(time.time())}_{os.urandom(6).hex()}"  # as uuid4().hex[:12]: 48 random bits

    pythonenv, pythonver = packing.pythonenv, packing.pythonver
    freezing = None
    if args.freeze:
        import subprocess

        from appliance.freeze import finish_freeze, start_freeze

        try:
            freezing = start_freeze(args.python)  # runs while the workspace is packed and sent
        except OSError as e:
            return _fail(_freeze_problem(args.python, e))
    try:
        ws_key, size = send_workspace(workdir, endpoint, creds.access_key, creds.secret_key,
                                      bucket, region, entries=packing.entries)
        if freezing:
            try:
                pythonenv, pythonver, skipped = finish_freeze(freezing, args.python)
            except (OSError, subprocess.CalledProcessError, ValueError) as e:
                return _fail(_freeze_problem(args.python, e))
            for line in skipped:
                print(f"appliance submit: not sent (only exists here): {line}", file=sys.stderr)
            print(f"appliance submit: environment from pip freeze: {len(pythonenv)} packages",
                  file=sys.stderr)
    except StoreProblem as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("appliance submit: interrupted; nothing queued", file=sys.stderr)
        return 130
    finally:
        if freezing and freezing.returncode is None:
            freezing.kill()
            freezing.communicate()

    base = key
    if array is not None:
        from appliance.jobs.intake import ARRAY_BASE, ARRAY_INDEX, ARRAY_LIMIT
        from appliance.jobs.policy import member_key
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
        except QueueRefused as e:  # the key is a job already (root's path; a member's says it through the API)
            return _fail(str(e))
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


def _freeze_problem(python: str, why) -> str:
    return (f"--python {python}: cannot read its packages ({why}); "
            "use --no-freeze with --pip, or point --python at your interpreter")
