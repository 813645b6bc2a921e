"""What `pip install` (install.sh) puts in the virtualenv: every package of appliance/."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_package_of_appliance_is_installed():
    text = (REPO / "pyproject.toml").read_text()
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*?)\]", text, re.M).group(1)))
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "appliance").rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
