"""Wheels made in the test (no network): a wheel is a zip with a dist-info folder. And the
environment that makes uv and pip install from a folder of them and nothing else."""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """`folder/name-version-py3-none-any.whl` holding `files` (path in site-packages -> text)."""
    dist = f"{name.replace('-', '_')}-{version}"
    meta = {f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
            f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: appliance-tests\nRoot-Is-Purelib: true\n"
                                       "Tag: py3-none-any\n"}
    everything = {**files, **meta}
    record = []
    for path, text in everything.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in everything.items():
            z.writestr(path, text)
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    os.chmod(folder, 0o755)
    return wheel


def offline_env(folder: Path) -> dict[str, str]:
    """A build environment in which uv and pip see only the wheels in `folder`."""
    return {"PATH": "/usr/bin:/bin", "UV_NO_INDEX": "1", "UV_FIND_LINKS": str(folder),
            "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(folder), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def marker_wheel(folder: Path, marker: Path, name: str = "uidmark", version: str = "1.0") -> Path:
    """A wheel whose one-line `.pth` appends the uid of every interpreter that starts in its
    venv to `marker` (world-writable), and a module that says it imported."""
    marker.touch()
    os.chmod(marker, 0o666)
    line = f"import os; open({str(marker)!r}, 'a').write('%d\\n' % os.getuid())\n"
    module = name.replace("-", "_")
    return make_wheel(folder, name, version, {f"{module}.pth": line,
                                              f"{module}_mod/__init__.py": f"VERSION = {version!r}\n"})
