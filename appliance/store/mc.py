"""The `mc` client's alias file (~/.mc/config.json), for users who still have an `mc`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from appliance.files import write_atomic


def mc_config_path() -> Path:
    return Path(os.environ.get("MC_CONFIG_DIR") or Path.home() / ".mc") / "config.json"


def write_alias(name: str, url: str, access_key: str, secret_key: str, path: Path | None = None) -> Path:
    """Add or update alias `name`, keeping every other alias the user has."""
    path = path or mc_config_path()
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError
    except (OSError, ValueError):
        doc = {"version": "10"}
    doc.setdefault("version", "10")
    aliases = doc.setdefault("aliases", {})
    aliases[name] = {"url": url, "accessKey": access_key, "secretKey": secret_key, "api": "s3v4",
                     "path": "auto"}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc, indent=2) + "\n", mode=0o600)
    return path


def read_alias(name: str, path: Path | None = None) -> dict | None:
    try:
        return json.loads((path or mc_config_path()).read_text())["aliases"][name]
    except (OSError, ValueError, KeyError):
        return None
