"""The status facts a CLI shows, asked of the API: every client through it.

Root may also read the home directly, and does when no API answers (the appliance is stopped,
or was started by a release without one): `status` then says what the files say.
"""

from __future__ import annotations

import os

from appliance.api.client import Client, NotRunning
from appliance.paths import Home


def status_facts(home: Home) -> dict:
    try:
        return Client(home).get("/v1/status")["facts"]
    except NotRunning:
        if os.geteuid() != 0:
            raise
    from appliance.status import gather

    return gather(home)
