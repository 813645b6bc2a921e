"""One POST of an event to a webhook: its body (Slack's `{"text": ...}` for a hooks.slack.com URL,
the event's JSON otherwise), how a URL is shown in logs (never its path: a Slack webhook's path
is its secret), and what went wrong, in one line, when the receiver did not take it.
"""

from __future__ import annotations

import hashlib
import json
import socket
import urllib.error
import urllib.request
from typing import Optional
from urllib.parse import urlsplit


def hook_id(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:10]


def shown(url: str) -> str:
    """A URL as logs show it: no path or query (a Slack webhook's path is its secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}/… (webhook {hook_id(url)})"


def is_slack(url: str) -> bool:
    return (urlsplit(url).hostname or "").lower() == "hooks.slack.com"


def slack_escaped(text: str) -> str:
    """Text as Slack shows it literally: its control characters `&`, `<` and `>` escaped, so a
    submitter's `<!channel>` or `<https://evil|click>` in a key or reason is shown, not acted on."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def body_for(url: str, event: dict) -> bytes:
    if is_slack(url):
        text = f"[{event.get('host', '?')}] {event.get('text', '')}"
        return json.dumps({"text": slack_escaped(text)}).encode()
    return json.dumps(event).encode()


def post(url: str, event: dict, timeout: float) -> Optional[str]:
    """POST one event; None when the receiver took it (2xx), else what went wrong."""
    req = urllib.request.Request(url, data=body_for(url, event), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "appliance-notify"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read(65536)
            return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, socket.timeout) or "timed out" in str(reason):
            return f"no answer within {timeout:g}s (notify.timeout)"
        return f"unreachable: {reason}"
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout:g}s (notify.timeout)"
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
