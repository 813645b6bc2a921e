"""The packages of an interpreter, as `pip freeze --all` lists them: what `submit --freeze`
sends as the request's `pythonenv` (the StudioML client sends the same)."""

from __future__ import annotations

import json
import subprocess

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
