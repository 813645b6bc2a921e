"""Tests run against real parts. Locally a missing part skips; in CI (CI=true) it fails."""

from __future__ import annotations

import os
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(ok: bool, what: str) -> None:
    """Skip (or, in CI, fail) the calling test unless `ok`; `what` says what is missing."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"CI needs {what}, and it is missing", pytrace=False)
    pytest.skip(f"needs {what}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
