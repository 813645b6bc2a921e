"""Every shell block of README.md, docs/ and examples/ runs as written.

A block is a fence opened with ```sh (or ```bash, ```shell); fences without a language are
output samples and are not run. A block the test must not run has the line
`<!-- docs-test: skip (why) -->` just above its fence (README, "Tests and layout").

Each block runs in bash (`set -e`) in a fresh git checkout of this tree, against an appliance
this test brings up: `/var/lib/appliance` in the text is read as that appliance's home (the
default home of an installed appliance), `appliance` on PATH is a launcher that knows it (what
install.sh puts there), `sudo` runs the command as is (the test is root), `python3` has boto3,
and `studio` is the real StudioML client (tests/test_studioml_client.py builds it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_studioml_client import studioml_client  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parent.parent
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+?)\)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
SHELLS = {"sh", "bash", "shell"}
DEFAULT_HOME = "/var/lib/appliance"


def doc_files() -> list:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")),
            *sorted((REPO / "examples").rglob("*.md"))]


def shell_blocks(text: str) -> list:
    """[(line number of the fence, code, skip reason or "")] of a markdown text."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if lang in SHELLS:
            above = "\n".join(lines[max(0, start - 2):start])
            skip = SKIP.search(above)
            blocks.append((start + 1, "\n".join(lines[start + 1:j]), skip.group(1) if skip else ""))
        i = j + 1
    return blocks


@pytest.mark.parametrize("text, expected", [
    ("```sh\necho hi\n```\n", [(1, "echo hi", "")]),
    ("```\n$ appliance status\n```\n", []),                      # output sample
    ("```toml\n[a]\n```\n", []),
    ("<!-- docs-test: skip (installs things) -->\n```sh\nsudo ./install.sh\n```\n",
     [(2, "sudo ./install.sh", "installs things")]),
    ("text\n\n```bash\na\nb\n```\nmore\n```sh\nc\n```\n", [(3, "a\nb", ""), (8, "c", "")]),
])
def test_shell_blocks_are_found(text, expected):
    assert shell_blocks(text) == expected


def all_blocks() -> list:
    out = []
    for f in doc_files():
        for line, code, skip in shell_blocks(f.read_text()):
            out.append(pytest.param(f, line, code, skip, id=f"{f.relative_to(REPO)}:{line}"))
    return out


def test_the_skip_list_stays_short():
    skipped = [(p.values[0].name, p.values[3]) for p in all_blocks() if p.values[3]]
    assert len(skipped) <= 5, skipped  # README, "Tests and layout", names them


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A fresh git checkout of this tree as it is now (uncommitted edits included)."""
    dest = tmp_path_factory.mktemp("checkout") / "appliance"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.email=docs@test", "-c", "user.name=docs-test"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "checkout"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def shell_env(running_appliance, studioml_client, tmp_path_factory) -> dict:
    bin_dir = tmp_path_factory.mktemp("bin")
    launcher = bin_dir / "appliance"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m appliance --home {running_appliance.root} "$@"\n')
    sudo = bin_dir / "sudo"
    sudo.write_text('#!/bin/sh\nexec "$@"\n')
    for f in (launcher, sudo):
        f.chmod(0o755)
    user_home = tmp_path_factory.mktemp("user-home")
    env = {k: v for k, v in running_appliance.env.items() if not k.startswith(("AWS_", "STUDIOML"))}
    env.update(HOME=str(user_home), LANG="C.UTF-8", XDG_CACHE_HOME=str(user_home / ".cache"),
               PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), str(studioml_client),
                                     "/usr/local/bin", "/usr/bin", "/bin"]))
    return env


@pytest.mark.integration
@pytest.mark.parametrize("doc, line, code, skip", all_blocks())
def test_the_block_runs_as_written(doc, line, code, skip, checkout, shell_env, running_appliance):
    if skip:
        pytest.skip(f"marked in {doc.name}: {skip}")
    script = code.replace(DEFAULT_HOME, str(running_appliance.root))
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=checkout, env=shell_env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (f"{doc.relative_to(REPO)} line {line} exited {result.returncode}:\n"
                                    f"{code}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")
