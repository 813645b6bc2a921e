"""Which packages a submitted project needs: read from the project itself, never the whole
interpreter.

The first source that exists wins, in this order:

1. `uv.lock`: the locked packages the project's own dependencies reach (not its dev groups),
   pinned `name==version`;
2. `pyproject.toml`: `[project] dependencies`, as written;
3. `requirements.txt`: its lines (`-r other.txt` followed inside the folder);
4. the imports of the folder's Python files (read with `ast`, never imported), stdlib modules
   and the folder's own modules left out, mapped to the distributions installed in the
   submitting interpreter at their installed versions (`imports_script` runs there);
5. nothing.

`submit --freeze` sends the interpreter's whole `pip freeze` instead (appliance/freeze.py).

Everything here is pure text in, lists out, so it is tested with tables
(tests/test_project_env.py). What only exists on this machine (editable installs, local paths,
`name @ file:...`) and what a runner would refuse (URLs, git sources) is returned as
`skipped` with the reason, so `submit` can say it was left out; pip options that only steer
pip (`--index-url`, `--hash`) are dropped, the runner's own index settings apply.
"""

from __future__ import annotations

import ast
import posixpath
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

try:
    import tomllib as _toml
except ImportError:  # Python < 3.11
    import tomlkit as _toml  # type: ignore[no-redef]

REQUIREMENTS_FILE = "requirements.txt"
SOURCES = ("uv.lock", "pyproject.toml", REQUIREMENTS_FILE)


@dataclass
class ProjectEnv:
    source: str                      # "uv.lock", "pyproject.toml", "requirements.txt", "imports", "none"
    requirements: list = field(default_factory=list)
    skipped: list = field(default_factory=list)   # (what, why): not sent
    missing: list = field(default_factory=list)   # imported, not installed in the interpreter

    def describe(self, extra: int = 0) -> str:
        """The one line `submit` prints."""
        n = len(self.requirements)
        text = f"environment from {self.source}: {n} package{'s' if n != 1 else ''}"
        if self.source == "none":
            text = "environment: none (no uv.lock, pyproject.toml, requirements.txt or imports of installed packages)"
        if extra:
            text += f", plus {extra} from --pip"
        return text


class ProjectEnvError(ValueError):
    """A project file that cannot be read; the message names it."""


def _name_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ------------------------------------------------------------------ uv.lock


def parse_uv_lock(text: str) -> tuple:
    """(requirements, skipped) of a uv.lock: what the project's dependencies reach."""
    try:
        data = _toml.loads(text)
    except Exception as e:  # noqa: BLE001 - tomllib and tomlkit raise different errors
        raise ProjectEnvError(f"uv.lock: not TOML ({e})") from None
    packages = [dict(p) for p in data.get("package", []) or []]
    by_name: dict = {}
    for p in packages:
        by_name.setdefault(_name_key(str(p.get("name", ""))), []).append(p)

    def local(p) -> bool:
        src = p.get("source") or {}
        return any(k in src for k in ("virtual", "editable", "directory", "path"))

    roots = [p for p in packages if local(p) and (p.get("source") or {}).get(
        "virtual", (p.get("source") or {}).get("editable")) == "."]
    if roots:
        seen, todo = set(), []
        for r in roots:
            seen.add(id(r))
            todo += list(r.get("dependencies") or [])
        reached = []
        while todo:
            dep = dict(todo.pop())
            for p in by_name.get(_name_key(str(dep.get("name", ""))), []):
                if dep.get("version") and p.get("version") != dep.get("version"):
                    continue
                if id(p) not in seen:
                    seen.add(id(p))
                    reached.append(p)
                    todo += list(p.get("dependencies") or [])
                for extra in dep.get("extra") or []:
                    todo += list((p.get("optional-dependencies") or {}).get(extra) or [])
        chosen = reached
    else:
        chosen = packages
    reqs, skipped, names = [], [], {}
    for p in chosen:
        names.setdefault(_name_key(str(p["name"])), []).append(p)
    for key in sorted(names):
        group = names[key]
        p = group[0]
        src = p.get("source") or {}
        if local(p):
            skipped.append((p["name"], "a local path: it only exists here"))
        elif "registry" not in src:
            skipped.append((p["name"], "not from a package index (a runner installs only those)"))
        elif len({g.get("version") for g in group}) > 1:
            reqs.append(str(p["name"]))  # locked at several versions, by markers: let pip choose
        else:
            reqs.append(f"{p['name']}=={p['version']}")
    return reqs, skipped


# ------------------------------------------------------------------ pyproject.toml


def parse_pyproject(text: str) -> Optional[tuple]:
    """(requirements, skipped) of `[project] dependencies`; None when it declares none."""
    try:
        data = _toml.loads(text)
    except Exception as e:  # noqa: BLE001
        raise ProjectEnvError(f"pyproject.toml: not TOML ({e})") from None
    project = data.get("project")
    if not isinstance(project, dict) or "dependencies" not in project:
        return None
    deps = project["dependencies"]
    if not isinstance(deps, list):
        raise ProjectEnvError("pyproject.toml: [project] dependencies is not a list")
    return _split_local([str(d).strip() for d in deps if str(d).strip()])


def _split_local(lines: Iterable[str]) -> tuple:
    reqs, skipped = [], []
    for line in lines:
        if " @ file:" in line or re.match(r"^[\w.\-\[\], ]+@\s*(\.|/)", line):
            skipped.append((line, "a local path: it only exists here"))
        else:
            reqs.append(line)
    return reqs, skipped


# ------------------------------------------------------------------ requirements.txt

# pip options that only steer pip itself: dropped (the runner's index settings apply)
_PIP_ONLY = ("-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--pre",
             "--no-index", "--prefer-binary", "--only-binary", "--no-binary", "--trusted-host",
             "-c", "--constraint", "--use-feature", "--require-hashes")


def parse_requirements(text: str, read: Callable[[str], Optional[str]],
                       name: str = REQUIREMENTS_FILE, _depth: int = 0) -> tuple:
    """(requirements, skipped) of a requirements file. `read(relpath)` gives an included
    file's text (None: not there); `-r`/`--requirement` are followed up to 10 deep."""
    reqs, skipped = [], []
    joined = re.sub(r"\\\r?\n", " ", text)
    for n, raw in enumerate(joined.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        line = re.sub(r"\s--hash[= ]\S+", "", line).strip()
        include = re.match(r"^(?:-r|--requirement)\s*=?\s*(\S+)$", line)
        if include:
            inner = posixpath.normpath(posixpath.join(posixpath.dirname(name), include.group(1)))
            body = read(inner) if _depth < 10 else None
            if body is None:
                raise ProjectEnvError(f"{name} line {n}: -r {inner}: no such file inside the folder")
            r, s = parse_requirements(body, read, inner, _depth + 1)
            reqs += r
            skipped += s
        elif re.match(r"^(-e|--editable)\b", line):
            skipped.append((line, "an editable install: it only exists here"))
        elif line.startswith("-"):
            if line.split("=", 1)[0].split(" ", 1)[0] not in _PIP_ONLY:
                raise ProjectEnvError(f"{name} line {n}: {line!r} is a pip option the appliance "
                                      "does not pass on; write requirement specifiers only")
        elif line.startswith((".", "/")) or line.startswith("file:"):
            skipped.append((line, "a local path: it only exists here"))
        else:
            r, s = _split_local([line])
            reqs += r
            skipped += s
    return reqs, skipped


# ------------------------------------------------------------------ imports


def imported_modules(python_files: dict) -> set:
    """Top-level module names the files import (absolute imports only). `python_files` maps
    a relative path to its text; a file that does not parse is passed over."""
    found = set()
    for text in python_files.values():
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def own_modules(relpaths: Iterable[str]) -> set:
    """Names the folder's own files and folders provide (`pkg/`, `model.py` -> pkg, model), at
    any depth: a script imports its neighbours wherever it sits."""
    own = set()
    for rel in relpaths:
        parts = rel.split("/")
        own.update(parts[:-1])
        last = parts[-1]
        own.add(last[:-3] if last.endswith(".py") else last.split(".")[0] if last.endswith(".so") else last)
    return own


def from_imports(modules: set, own: set, found: dict) -> ProjectEnv:
    """The environment for `modules`, given `found` from IMPORTS_SCRIPT (module -> list of
    [distribution, version, installed from a local folder] in the interpreter; absent: stdlib;
    []: not installed)."""
    reqs, missing, skipped = {}, [], []
    for mod in sorted(modules - own):
        if mod not in found:
            continue  # stdlib
        dists = found[mod]
        if not dists:
            missing.append(mod)
        for dist, version, *local in dists:
            if local and local[0]:
                skipped.append((f"{dist} (imported as {mod})", "installed from a local folder: it only exists here"))
            elif _name_key(dist) != "studioml":
                reqs[_name_key(dist)] = f"{dist}=={version}"
    if not reqs and not missing:
        return ProjectEnv("none", skipped=skipped)
    return ProjectEnv("imports", [reqs[k] for k in sorted(reqs)], skipped=skipped, missing=missing)


# Run in the submitting interpreter (`--python`), module names on stdin, one a line. Prints
# {"version": "3.11", "found": {module: [[dist, version], ...]}} with stdlib modules left out.
IMPORTS_SCRIPT = r"""
import json, os, sys
from importlib import metadata
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
mods = [m for m in sys.stdin.read().split() if m]
std = getattr(sys, "stdlib_module_names", None)
if std is None:
    import importlib.util, sysconfig
    lib = sysconfig.get_paths()["stdlib"]
    def is_std(m):
        if m in sys.builtin_module_names:
            return True
        try:
            spec = importlib.util.find_spec(m)
        except Exception:
            return False
        o = getattr(spec, "origin", None) or ""
        return bool(spec) and o.startswith(lib) and "site-packages" not in o
else:
    def is_std(m):
        return m in std or m in sys.builtin_module_names
if not mods:
    pd = {}  # only the version is asked: no need to read every distribution
elif hasattr(metadata, "packages_distributions"):
    pd = metadata.packages_distributions()
else:
    pd = {}
    for d in metadata.distributions():
        top = (d.read_text("top_level.txt") or "").split()
        for f in (d.files or []):
            top.append(str(f).split("/")[0].split(".")[0])
        for t in set(top):
            pd.setdefault(t, []).append(d.metadata["Name"])
found = {}
for m in mods:
    if is_std(m):
        continue
    out = []
    for name in sorted(set(pd.get(m, []))):
        try:
            dist = metadata.distribution(name)
            try:
                direct = json.loads(dist.read_text("direct_url.json") or "{}")
            except ValueError:
                direct = {}
            local = bool((direct.get("dir_info") or {}).get("editable")) or \
                str(direct.get("url", "")).startswith("file:")
            out.append([name, dist.version, local])
        except Exception:
            pass
    found[m] = out
print(json.dumps({"version": "%d.%d" % sys.version_info[:2], "found": found}))
"""


def from_project_files(read: Callable[[str], Optional[str]]) -> Optional[ProjectEnv]:
    """The environment the project's own files declare (uv.lock, pyproject.toml,
    requirements.txt, first one that counts), or None. `read(relpath)` gives a file's text."""
    text = read("uv.lock")
    if text is not None:
        reqs, skipped = parse_uv_lock(text)
        return ProjectEnv("uv.lock", reqs, skipped)
    text = read("pyproject.toml")
    if text is not None:
        got = parse_pyproject(text)
        if got is not None:
            return ProjectEnv("pyproject.toml", got[0], got[1])
    text = read(REQUIREMENTS_FILE)
    if text is not None:
        reqs, skipped = parse_requirements(text, read)
        return ProjectEnv(REQUIREMENTS_FILE, reqs, skipped)
    return None


# ------------------------------------------------------------------ the submitting side

MAX_SCANNED_FILE = 2**20  # a larger .py file is data, not code: its imports are not read


def read_inside(root) -> Callable[[str], Optional[str]]:
    """`read(relpath)` for files inside `root` (None for a missing file or a path outside)."""
    import os

    base = os.path.realpath(root)

    def read(rel: str) -> Optional[str]:
        full = os.path.realpath(os.path.join(base, rel))
        if not full.startswith(base + os.sep) or not os.path.isfile(full):
            return None
        with open(full, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    return read


def project_env(root, entries: list, python: str) -> tuple:
    """(ProjectEnv, "3.11") for the folder `root` whose packed entries (workspace.walk) are
    `entries`, asking the interpreter `python` (the submitter's) about imports and its version.
    ProjectEnvError for an unreadable project file; OSError/ValueError if `python` fails."""
    import json
    import subprocess

    read = read_inside(root)
    env = from_project_files(read)
    modules: set = set()
    if env is None:
        files = {e.rel: read(e.rel) or "" for e in entries
                 if e.kind == "file" and e.rel.endswith(".py") and e.st.st_size <= MAX_SCANNED_FILE}
        modules = imported_modules(files) - own_modules(e.rel for e in entries)
    out = subprocess.run([python, "-c", IMPORTS_SCRIPT], input="\n".join(sorted(modules)),
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise ValueError((out.stderr.strip().splitlines() or ["failed"])[-1])
    data = json.loads(out.stdout)
    if env is None:
        env = from_imports(modules, set(), data["found"])
    return env, data["version"]
