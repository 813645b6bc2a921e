"""What a build reports while it runs, read from its log as it grows.

`Progress` gets what is being resolved and downloaded (for the job's log) and "building env
(n/m)" (for the runner's status); uv's whole verbose log stays in the build's `.build.log`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Progress:
    """Where a build reports: `line` gets what is resolved and downloaded (for the job's log),
    `step` "building env (n/m)" (for the runner's status)."""

    line: Callable[[str], None] = lambda text: None
    step: Callable[[str], None] = lambda text: None


_SELECTING = re.compile(r"^DEBUG Selecting: (\S+)")
_RESOLVED = re.compile(r"^Resolved (\d+) packages?")
_UNCACHED = re.compile(r"^DEBUG Identified uncached distribution: (\S+)")
_FETCHING = re.compile(r"^DEBUG Sending fresh GET request for: (\S+)")


class _LogTail:
    """Follows a build's log as it grows and tells `Progress` what matters in it: uv's
    selections, downloads and summary lines (not its DEBUG chatter), pip's own lines."""

    def __init__(self, path: Path, progress: Progress):
        self.f = open(path, "rb")
        self.progress = progress
        self.rest = b""
        self.total = 0  # packages resolved
        self.done = 0  # cached, or their download started
        self.selected = 0

    def poll(self) -> None:
        data = self.rest + self.f.read()
        *lines, self.rest = data.split(b"\n")
        for raw in lines:
            try:
                self._one(raw.decode(errors="replace").rstrip())
            except Exception:  # a reporting hiccup never fails a build
                pass

    def close(self) -> None:
        self.poll()
        self.f.close()

    def _step(self) -> None:
        if self.total:
            self.progress.step(f"building env ({min(self.done, self.total)}/{self.total})")
        else:
            self.progress.step(f"building env (resolving, {self.selected} selected)")

    def _one(self, text: str) -> None:
        if not text:
            return
        m = _SELECTING.match(text)
        if m:
            self.selected += 1
            self.progress.line(f"resolving: {m.group(1)}")
            return self._step()
        m = _RESOLVED.match(text)
        if m:
            self.total = self.done = int(m.group(1))
            self.progress.line(text)
            return None
        m = _UNCACHED.match(text)
        if m:
            self.done -= 1
            return None
        m = _FETCHING.match(text)
        if m:
            if "/simple/" not in m.group(1):
                self.done += 1
                self.progress.line(f"downloading {m.group(1).rsplit('/', 1)[-1]}")
                self._step()
            return
        if text.startswith(("DEBUG ", "TRACE ", "WARN ", "$ ", "Using Python ")):
            return
        if text.startswith("Collecting "):  # pip
            self.selected += 1
            self._step()
        if text.startswith(("Installed ", "Successfully installed")):
            self.done = self.total
            self._step()
        self.progress.line(text)
