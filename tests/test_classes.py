"""The failure class of every way a job can end (runner/classes.py), as a table."""

import pytest

from appliance.runner import classes, execute

TABLE = [
    (execute.SUCCESS, 0, "", "success"),
    (execute.FAILED, 1, "exit code 1", "user"),
    (execute.FAILED, 137, "killed by signal 9", "user"),
    (execute.FAILED, None, "artifact 'workspace' not found: s3://b/k", "user"),
    (execute.FAILED, None, "store unavailable: http://127.0.0.1:9", "infrastructure"),
    (execute.FAILED, None, "the disk is full", "infrastructure"),
    (execute.FAILED, None, "runner error: RuntimeError: boom", "infrastructure"),
    (execute.OUT_OF_MEMORY, None, "killed for memory over 512 MiB", "oom"),
    (execute.TIMED_OUT, None, "lifetime exceeded", "timeout"),
    (execute.HUNG, None, "no CPU progress and no output for 2s", "hung"),
    (execute.OVER_GPU_SHARE, None, "GPU memory 3 GiB over a 2 GiB share", "user"),
    (execute.INTERRUPTED, None, "runner stopping (drain)", "infrastructure"),
    ("released", None, "runner error: OSError", "infrastructure"),
    (execute.ENV_FAILED, None, "'-e .': only requirement specifiers like 'numpy==1.26.4' are accepted",
     "environment"),
    (execute.ENV_FAILED, None, "building the Python environment failed\nERROR: No matching distribution "
     "found for nosuchpkg==9", "environment"),
    (execute.ENV_FAILED, None, "building the Python environment failed\n  × No solution found when "
     "resolving dependencies", "environment"),
    # a set that cannot be resolved, in the words of pip and uv: the request's, not retried
    (execute.ENV_FAILED, None, "building the Python environment failed: ERROR: Cannot install six==1.16.0 and "
     "six==1.17.0 because these package versions have conflicting dependencies. ERROR: ResolutionImpossible: "
     "for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/", "environment"),
    (execute.ENV_FAILED, None, "building the Python environment failed: error: Because demo was not found in "
     "the package registry and you require demo, we can conclude that your requirements are unsatisfiable.",
     "environment"),
    (execute.ENV_FAILED, None, "building the Python environment failed: error: Because demo was not found in "
     "the provided package locations and you require demo, ...", "environment"),
    (execute.ENV_FAILED, None, "building the Python environment failed: ERROR: Could not find a version that "
     "satisfies the requirement six==99 (from versions: 1.16.0, 1.17.0)", "environment"),
    (execute.ENV_FAILED, None, "building the Python environment failed: error: Failed to fetch: "
     "`https://pypi.org/simple/six/` cause: Request failed after 3 retries cause: error sending request",
     "infrastructure"),
    (execute.ENV_FAILED, None, "building the Python environment failed: ERROR: Could not install packages due "
     "to an OSError: [Errno 28] No space left on device", "infrastructure"),
    (execute.ENV_FAILED, None, "building the Python environment failed\nConnection refused "
     "(pypi.org:443)", "infrastructure"),
    (execute.ENV_FAILED, None, "environment: PermissionError: /var/lib", "infrastructure"),
    (execute.ENV_FAILED, None, "building the Python environment failed\nWARNING: Retrying ... "
     "NewConnectionError: [Errno 111] Connection refused\nERROR: No matching distribution found for x",
     "infrastructure"),
    (execute.CANCELLED, None, "cancelled (appliance cancel): stopped with SIGTERM", "cancelled"),
    ("something new", None, "", "infrastructure"),
]


@pytest.mark.parametrize("outcome,code,reason,cls", TABLE)
def test_class_of_each_ending(outcome, code, reason, cls):
    assert classes.classify(outcome, code, reason) == cls
    assert cls in classes.CLASSES


def test_only_infrastructure_is_retried():
    assert [c for c in classes.CLASSES if classes.retried(c)] == ["infrastructure"]
