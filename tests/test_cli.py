"""The `appliance` command as a shell user meets it."""

from __future__ import annotations

import os
import subprocess
import sys


def _appliance(home, *args) -> list[str]:
    return [sys.executable, "-m", "appliance", "--home", str(home), *args]


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`appliance status --json | head -1`: once head has its line and is gone, the command
    stops as git and ls do (SIGPIPE's exit status 141), with no traceback on the terminal."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: every write fails
    try:
        done = subprocess.run(_appliance(tmp_path / "home", "status", "--json"), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode in (0, 141)


def test_head_in_a_real_shell_pipe_gets_its_line(tmp_path):
    done = subprocess.run(" ".join(_appliance(tmp_path / "home", "status", "--json")) + " | head -1",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert done.stdout == "{\n"
    assert done.stderr == ""
    assert done.returncode == 0
