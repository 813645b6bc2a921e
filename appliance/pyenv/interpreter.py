"""Which interpreter a venv is built from, and its version (part of the venv's key)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Callable, Optional


def interpreter_for(pythonver: Optional[str], usable: Callable[[str], bool] = lambda path: True) -> str:
    """An interpreter for the requested `pythonver` ("3.11"): `python3.11` on PATH (or Debian's
    /usr/bin/python3.11), else the one the runner runs on (base interpreter, not the
    appliance's venv). `usable(path)` says whether the workload's user may run it (a pyenv
    interpreter under /root is no use to an unprivileged account); the first usable one wins."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    candidates = []
    if pythonver:
        ver = str(pythonver).strip()
        if re.fullmatch(r"\d+(\.\d+)?", ver):
            candidates += [shutil.which(f"python{ver}"), f"/usr/bin/python{ver}"]
    candidates += [base, shutil.which("python3"), "/usr/bin/python3"]
    for c in candidates:
        if c and os.access(c, os.X_OK) and usable(c):
            return c
    return base


_versions: dict = {}


def python_version(python: str) -> str:
    """"3.11.7" for an interpreter path (asked once per runner process)."""
    if python not in _versions:
        _versions[python] = _ask_version(python)
    return _versions[python]


def _ask_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or python
