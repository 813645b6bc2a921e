"""What `submit` leaves out of a workspace: `.applianceignore` and `.gitignore` files, in
gitignore syntax (https://git-scm.com/docs/gitignore).

Each ignore file applies to its own folder and those below it; later lines win over earlier
ones, a file deeper down over one above, and `.applianceignore` over `.gitignore` in the same
folder (so `!data/` in `.applianceignore` sends what git ignores). As in git, what sits in an
ignored folder cannot be brought back. Supported: `#` comments, `!` negation, a trailing `/`
(folders only), a leading or inner `/` (anchored to the file's folder), `*`, `?`, `[...]`,
`**` and backslash escapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

IGNORE_FILES = (".gitignore", ".applianceignore")  # later wins


@dataclass(frozen=True)
class Rule:
    base: str        # folder of the ignore file, relative to the workspace ("" at the top)
    regex: "re.Pattern"
    negate: bool
    dir_only: bool


def _translate(glob: str) -> str:
    out, i, n = [], 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if glob.startswith("**", i):
                before_ok = i == 0 or glob[i - 1] == "/"
                after = glob[i + 2:i + 3]
                if before_ok and after == "/":
                    out.append("(?:.*/)?")
                    i += 3
                    continue
                if before_ok and after == "":
                    out.append(".*")
                    i += 2
                    continue
                out.append("[^/]*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = glob.find("]", i + 2 if glob[i + 1:i + 2] in ("!", "^") else i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = glob[i + 1:j]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def parse(text: str, base: str = "") -> list:
    """The rules of one ignore file whose folder is `base`."""
    rules = []
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"(?<!\\)\s+$", "", line)  # trailing blanks, unless escaped
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        elif line.startswith("\\!") or line.startswith("\\#"):
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            continue
        anchored = "/" in line
        line = line.lstrip("/")
        pattern = _translate(line)
        regex = re.compile(("^" if anchored else "^(?:.*/)?") + pattern + "$")
        rules.append(Rule(base, regex, negate, dir_only))
    return rules


def ignored(rules: Iterable[Rule], rel: str, is_dir: bool) -> bool:
    """Whether workspace path `rel` ("a/b.txt") is left out by `rules` (in file order)."""
    verdict = False
    for rule in rules:
        if rule.base:
            if not rel.startswith(rule.base + "/"):
                continue
            sub = rel[len(rule.base) + 1:]
        else:
            sub = rel
        if rule.dir_only and not is_dir:
            continue
        if rule.regex.match(sub):
            verdict = not rule.negate
    return verdict
