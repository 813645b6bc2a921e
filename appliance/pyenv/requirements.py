"""The requirement set a venv is built from, and the key it is cached under.

The requirement set is the request's `pythonenv` (the client's whole `pip freeze`) without
`studioml` itself, plus `config.pip`. Only requirement specifiers are accepted (PEP 508, as
`packaging` parses them: name, extras, versions, markers): a pip option (`-r /etc/shadow`,
`--index-url`), a direct reference (`name @ URL`) or a local path is refused (BadRequirement),
since pip would read files or run code from wherever the request points. Two kinds of lines
`pip freeze` writes for installs that only exist on the client's machine (`-e ...` and
`name @ file://...`) are skipped and returned, so the job output can say so. pip gets the
normalized specifiers (`str(Requirement(line))`, never the raw line) as arguments, not as a
requirements file, whose own syntax (`${VAR}`, `#`, options after a requirement) would be
one more language to police. The key is a hash of the sorted, de-duplicated set and the
interpreter's version, so the same set always maps to the same venv at `VENVS/<key>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

from appliance.sha256 import sha256

if TYPE_CHECKING:
    from packaging.requirements import Requirement


# what pip takes for a local archive even when it parses as a name ("evil.tar.gz")
_ARCHIVES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz",
             ".tlz", ".tar.lz", ".tar.lzma")
_EDITABLE = re.compile(r"(-e|--editable)(\s|=)")
_SEPARATORS = re.compile(r"[-_.]+")


class BadRequirement(ValueError):
    """A requirement line that is not a plain requirement specifier."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems) + ": only requirement specifiers like 'numpy==1.26.4' "
                         "are accepted (no pip options, URLs or local paths)")


def _problem(line: str) -> tuple[Optional[Requirement], str]:
    """(the parsed requirement, "") or (None, what is wrong with it)."""
    from packaging.requirements import InvalidRequirement, Requirement  # loaded by a job that has requirements
    if line.startswith("-"):
        return None, "is a pip option"
    try:
        req = Requirement(line)
    except InvalidRequirement:
        return None, "is not a requirement specifier"
    if req.url:
        return None, "is a direct reference to a URL or file"
    if req.name.lower().endswith(_ARCHIVES):
        return None, "names an archive, which pip would read as a local path"
    return req, ""


def normalized(lines: Iterable[str]) -> list[str]:
    """Sorted, de-duplicated `str(Requirement(line))`; BadRequirement names every bad line."""
    out, bad = set(), []
    for line in lines:
        req, why = _problem(str(line).strip())
        if req is None:
            bad.append(f"requirement {str(line).strip()!r} {why}")
        else:
            out.add(str(req))
    if bad:
        raise BadRequirement(bad)
    return sorted(out)


@dataclass
class RequirementSet:
    lines: list[str]  # normalized requirement specifiers to install, sorted
    skipped: list[str] = field(default_factory=list)  # client-local installs, not installed

    def __iter__(self) -> Iterator[str]:
        return iter(self.lines)


def _client_local(line: str) -> bool:
    """A line `pip freeze` writes for an install from the client's own disk."""
    if _EDITABLE.match(line):
        return True
    from packaging.requirements import InvalidRequirement, Requirement
    try:
        url = Requirement(line).url
    except InvalidRequirement:
        return False
    return bool(url) and url.startswith("file:")


def canonical_name(name: str) -> str:
    """A distribution's name as PEP 503 normalizes it (packaging's canonicalize_name, whose
    import costs a long-lived runner ~1 MB of memory for this one rule)."""
    return _SEPARATORS.sub("-", name).lower()


def requirement_set(pythonenv: Iterable[str], pip: Iterable[str] = ()) -> RequirementSet:
    """What a venv is built from; raises BadRequirement naming every line that is refused."""
    lines, skipped, bad = set(), [], []
    for where, given in (("pythonenv", pythonenv), ("config.pip", pip)):
        for raw in given or ():
            line = str(raw).strip()
            if not line or line.startswith("#"):
                continue
            if _client_local(line):
                skipped.append(line)
                continue
            req, why = _problem(line)
            if req is None:
                bad.append(f"{where} line {line!r} {why}")
            elif canonical_name(req.name) != "studioml":
                lines.add(str(req))
    if bad:
        raise BadRequirement(bad)
    return RequirementSet(sorted(lines), skipped)


def env_key(requirements: list[str], version: str) -> str:
    h = sha256()
    h.update(f"python {version}\n".encode())
    for r in requirements:
        h.update(r.encode() + b"\n")
    return h.hexdigest()[:24]
