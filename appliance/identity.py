"""This appliance's id: how the appliances sharing a RabbitMQ or SQS queue tell each other apart.

`<hostname>-<8 hex>`, made once from the host name and the home's path and kept in
HOME/appliance-id, so it stays the same across restarts and for every slot (a runner in a
container sees another host name: it reads the file `appliance up` wrote). Two homes on one host
are two appliances.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from appliance.sha256 import sha256


def _new_id(home) -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:60] or "host"
    return f"{host}-{sha256(str(home.root).encode()).hexdigest()[:8]}"


def appliance_id(home) -> str:
    """The id in HOME/appliance-id; made (once, atomically: the first writer wins) if missing."""
    path = Path(home.appliance_id_file)
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    new = _new_id(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(new + "\n")
    os.chmod(tmp, 0o644)
    try:
        os.link(tmp, path)  # fails if another process made it first: theirs stands
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip() or new
