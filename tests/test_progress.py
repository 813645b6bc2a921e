"""The progress line of a long submit: bytes, rate and time left, only on a terminal."""

from __future__ import annotations

import io

from appliance.progress import Progress, line


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_line_says_bytes_rate_and_time_left():
    assert line("packing", 512 * 2**20, 2 * 2**30, 4.0) == "packing  512MiB/2GiB  25%  128MiB/s  12s left"


def test_quiet_for_the_first_second_then_redrawn_in_place():
    now = [0.0]
    out = Terminal()
    p = Progress("uploading", 100 * 2**20, stream=out, clock=lambda: now[0])
    p.add(10 * 2**20)
    assert out.getvalue() == ""  # under a second: nothing
    now[0] = 2.0
    p.add(10 * 2**20)
    assert out.getvalue() == "\r\x1b[K" + line("uploading", 20 * 2**20, 100 * 2**20, 2.0)
    p.close()
    assert out.getvalue().endswith("\n")


def test_silent_when_not_a_terminal():
    now = [0.0]
    out = io.StringIO()
    p = Progress("packing", 10, stream=out, clock=lambda: now[0])
    now[0] = 5.0
    p.add(5)
    p.close()
    assert out.getvalue() == ""
