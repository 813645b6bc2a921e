"""`appliance doctor` for a member (not the home's owner): what they rely on, through the API.

The API answers and knows them; they may submit under the queue mode; their store identity
works in their bucket. The box itself (cgroups, ports, secrets) is root's to check: `sudo
appliance doctor`.
"""

from __future__ import annotations


def member_findings(home) -> list[tuple[bool, str, str]]:
    from appliance.api.client import ApiClientError, Client
    from appliance.store.client import check_store

    client = Client(home)
    try:
        me = client.get("/v1/whoami")
    except ApiClientError as e:
        return [(False, "api", str(e))]
    out = [(True, "api", f"{client.path} answers; you are {me['name']} (uid {me['uid']})"
            + (", an admin" if me.get("admin") else ""))]
    if not me.get("member"):
        out.append((False, "access", "you are not in group appliance; ask an admin: sudo usermod -aG appliance "
                                     f"{me['name']}"))
        return out
    try:
        store = client.get("/v1/me/store")
    except ApiClientError as e:
        return out + [(False, "store identity", str(e))]
    problem = check_store(store["endpoint"], store["access_key"], store["secret_key"], store["bucket"], store["region"])
    out.append((problem is None, "store identity",
                problem or f"your key works in your bucket {store['bucket']} at {store['endpoint']}"))
    out.append((True, "the box", "cgroups, ports and secrets are root's to check: sudo appliance doctor"))
    return out
