"""The job commands' side of the API (`jobs`, `history`, `cancel`, `hold`, `release`, `requeue`,
`wait`): every call goes to the API; root, when no API answers (the appliance is down), is
answered by the same route handlers over the table directly, so `history` works on a stopped box.
"""

from __future__ import annotations

import os
import sys
import urllib.parse

from appliance.api.client import Client, NotRunning
from appliance.paths import Home


def call(home: Home, method: str, path: str, body: dict | None = None, timeout: float = 120.0) -> dict:
    try:
        return Client(home, timeout=timeout).call(method, path, body if body is not None or method == "GET" else {})
    except NotRunning:
        if os.geteuid() != 0:
            raise
    return _here(home, method, path, body)


def _here(home: Home, method: str, path: str, body: dict | None) -> dict:
    """Root without an API: the route's handler, called in this process as root."""
    from appliance.api.client import ApiClientError
    from appliance.api.protocol import Caller
    from appliance.api.routes import ApiError, Request, match
    from appliance.config import load_config

    import appliance.api.jobs_routes  # noqa: F401 - registers the routes

    url = urllib.parse.urlsplit(path)
    query = dict(urllib.parse.parse_qsl(url.query))
    query.pop("wait", None)  # nothing can end while the appliance is down
    found, params = match(method, url.path)
    caller = Caller(uid=0, gid=0, pid=os.getpid(), name="root", admin=True, member=True)
    try:
        return found.handler(Request(caller=caller, method=method, path=url.path, params=params, query=query,
                                     body=body, home=home, config=load_config(home.config_file)))
    except ApiError as e:
        raise ApiClientError(e.message, e.status) from None


def quote(key: str) -> str:
    return urllib.parse.quote(key, safe="")


def job_state(home: Home, key: str, wait: float = 0) -> dict | None:
    """What the job table says of `key` (a job or an array): {"key", "jobs": [...], "code"}; None
    when it does not know it (a job from before the table, another member's) or nothing answers."""
    from appliance.api.client import ApiClientError

    try:
        return call(home, "GET", f"/v1/jobs/{quote(key)}" + (f"?wait={wait:g}" if wait else ""),
                    timeout=wait + 30)
    except ApiClientError:
        return None
    except Exception:  # noqa: BLE001 - the table is an addition to logs/results, never their failure
        return None


def ended_line(state: dict) -> str | None:
    """One line for a job that failed or never ran (dead-lettered: with the reason); None for success."""
    job = state["jobs"][0] if len(state["jobs"]) == 1 else None
    if job is None or state["code"] in (None, 0):
        return None
    if job["state"] == "cancelled":
        return f"{job['key']} was cancelled ({job.get('reason') or 'appliance cancel'})"
    if job.get("exit_code") is None and job.get("class") not in ("oom", "timeout", "hung"):
        return f"{job['key']} was dead-lettered, it never ran to the end: {job.get('reason') or job.get('class')}"
    return (f"{job['key']} failed [class: {job.get('class')}]" + (f": {job['reason']}" if job.get("reason") else "")
            + f" (exit code {state['code']})")


def exit_code(home, key: str, wait: float = 0) -> int:
    """The job's code (`appliance wait`'s), saying on stderr how a failed job ended; 0 when the
    table does not know the job."""
    state = job_state(home, key, wait)
    if not state or state.get("code") is None:
        return 0
    line = ended_line(state)
    if line:
        print(f"appliance: {line}", file=sys.stderr)
    return state["code"]
