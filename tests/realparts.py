"""Tests run against real parts. Locally a missing part skips; in CI (CI=true) it fails."""

from __future__ import annotations

import os
import socket
import time

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


def wait_for(what: str, predicate, timeout: float = 180.0, every: float = 0.1):
    """Poll `predicate` until it returns something truthy, and return that; fail naming `what`
    after `timeout` seconds (a bound on waiting, never a measured time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


class full_filesystem:
    """A real, small filesystem (tmpfs of `size`) mounted at `path`, filled to its last byte on
    entry; `free()` gives the space back, as an operator deleting a big file would. Unmounted
    on exit."""

    def __init__(self, path, size: str = "1m"):
        self.path = os.fspath(path)
        self.size = size
        self.filler = os.path.join(self.path, ".filler")

    def __enter__(self):
        import subprocess
        os.makedirs(self.path, exist_ok=True)
        need(os.geteuid() == 0, "root (to mount a small tmpfs)")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs",
                        self.path], check=True)
        self.fill()
        return self

    def fill(self) -> None:
        with open(self.filler, "ab") as f:
            chunk = b"\0" * 65536
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError:
                pass
            try:  # the page the buffer could not take
                while True:
                    os.write(f.fileno(), b"\0")
            except OSError:
                pass

    def free(self) -> None:
        os.unlink(self.filler)

    def __exit__(self, *exc):
        import subprocess
        subprocess.run(["umount", "-l", self.path], check=False)
