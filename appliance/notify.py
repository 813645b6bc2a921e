"""Notifications: events go to a spool on disk, the controller POSTs them to the webhooks.

Emitters (runners, the controller) append one JSON line per event to their own file,
`HOME/status/events/<writer>.jsonl` (root's alone, 0700/0600: events name experiments). That is
all they do, and nothing there can raise, block or slow a job.

The controller's `Deliverer` follows the spool with one thread per webhook (`[notify]` in
appliance.toml, re-read when it changes): each event the webhook wants is POSTed as JSON
(`{"text": ...}` for a hooks.slack.com URL), tried `notify.tries` times with a backoff of 1s,
2s, 4s, ... (at most a minute), each call at most `notify.timeout` long, then dropped with a log
line. Each webhook's position in the spool is saved after every event (`.delivery.json`, also
what `appliance doctor` reports), so a controller restart neither loses nor repeats more than
the event in flight; a slow or dead webhook holds back only its own messages. A webhook added
later starts with the events from then on. Spool files are emptied once every webhook has had
all of them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

from appliance.events import _ensure_spool, _lock, emit, spool_dir  # noqa: F401  (emit: what others call)
from appliance.notify_http import body_for, hook_id, is_slack, post, shown, slack_escaped  # noqa: F401

log = logging.getLogger("appliance.notify")

STATE = ".delivery.json"
COMPACT_BYTES = 64 << 10  # a spool file every webhook has read is emptied past this size
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
STORE_CHECK_S = 15.0  # how often the controller looks at the store (for store_down/store_back)
STEP_S = 1.0  # how often the delivery thread looks at the config and the spool while webhooks are set
IDLE_STEP_S = 60.0  # and without webhooks (the controller pokes it when appliance.toml changes)


# ------------------------------------------------------------------ controller events


def gpus_changed(home, old, new) -> None:
    """GPUs that were healthy and are gone or unhealthy now (gpu_lost), or the reverse (gpu_back)."""
    if old is None:
        return
    before = {g.uuid: g for g in old.gpus}
    after = {g.uuid: g for g in new.gpus}
    for uuid, g in before.items():
        now = after.get(uuid)
        if g.healthy and (now is None or not now.healthy):
            # a GPU NVML cannot open any more is listed by index only (gpus.py): its problem says why
            same_index = next((a.problem for a in new.gpus if a.index == g.index and not a.healthy), "")
            why = now.problem if now is not None else (same_index or new.problem or "NVML no longer lists it")
            emit(home, "controller", "gpu_lost", f"GPU {g.index} ({uuid}, {g.name}) lost: {why}; its slot drains",
                 gpu=uuid, index=g.index, reason=why)
    for uuid, g in after.items():
        was = before.get(uuid)
        if g.healthy and (was is None or not was.healthy):
            emit(home, "controller", "gpu_back", f"GPU {g.index} ({uuid}, {g.name}) is available again",
                 gpu=uuid, index=g.index)


def sources_changed(home, before: dict, rows: list) -> None:
    """Queue sources that broke (or were broken when first seen), and broken ones that work again."""
    for r in rows:
        was, now = before.get(r["name"]), r["state"]
        if now != "ok" and was in (None, "ok"):
            emit(home, "controller", "source_broken", f"queue source {r['name']} is BROKEN: {r['reason']}",
                 queue_source=r["name"], entry=r.get("entry"), reason=r["reason"])
        elif now == "ok" and was not in (None, "ok"):
            emit(home, "controller", "source_back", f"queue source {r['name']} works again",
                 queue_source=r["name"], entry=r.get("entry"))


# ------------------------------------------------------------------ delivering

class Deliverer:
    """The controller's side (see the module doc)."""

    def __init__(self, home):
        self.home = home
        self.lock = threading.Lock()  # the state below and its file
        self.stop_event = threading.Event()
        self.poked = threading.Event()  # appliance.toml changed: look at [notify] now
        self.state = self._load_state()
        self.workers: dict[str, _Worker] = {}
        self.config_sig = None
        self.config = None
        self.store_ok = True  # the last confirmed store state
        self.store_seen: Optional[bool] = None
        self.next_store_check = time.monotonic() + STORE_CHECK_S

    # -- state

    @property
    def state_file(self) -> Path:
        return spool_dir(self.home) / STATE

    def _load_state(self) -> dict:
        try:
            data = json.loads(self.state_file.read_text())
            if isinstance(data.get("hooks"), dict):
                return data
        except (OSError, ValueError, AttributeError):
            pass
        return {"hooks": {}}

    def _save(self) -> None:
        from appliance.files import write_atomic

        _ensure_spool(self.home)
        write_atomic(self.state_file, json.dumps(self.state, indent=1) + "\n", mode=0o600)

    def _files(self) -> list[Path]:
        d = spool_dir(self.home)
        return sorted(d.glob("*.jsonl")) if d.is_dir() else []

    def hook_state(self, url: str, create: bool = True) -> dict:
        """This webhook's entry (made, starting at the spool's end, the first time)."""
        hid = hook_id(url)
        entry = self.state["hooks"].get(hid)
        if entry is None and not create:
            return {"cursor": {}, "delivered": 0, "dropped": 0}  # no longer configured: a scratch entry
        if entry is None:
            entry = {"url": shown(url), "cursor": {p.name: p.stat().st_size for p in self._files()},
                     "delivered": 0, "dropped": 0, "failing": False, "last_error": "", "last_error_at": None,
                     "last_ok_at": None}
            self.state["hooks"][hid] = entry
            self._save()
        return entry

    def next_event(self, url: str) -> Optional[tuple]:
        """(file name, offset after it, event or None if unreadable) of the next unread line."""
        with self.lock:
            if hook_id(url) not in self.state["hooks"]:
                return None  # no longer configured
            cursor = self.state["hooks"][hook_id(url)]["cursor"]
            for path in self._files():
                try:
                    size = path.stat().st_size
                    offset = cursor.get(path.name, 0)
                    if offset > size:
                        offset = cursor[path.name] = 0  # emptied behind our back
                    if offset == size:
                        continue
                    with open(path, "rb") as f:
                        f.seek(offset)
                        line = f.readline(1 << 20)
                except OSError as e:
                    log.warning("reading %s: %s", path, e)
                    continue
                if not line.endswith(b"\n"):
                    continue  # still being written
                try:
                    event = json.loads(line)
                except ValueError:
                    log.warning("%s at %d: not a JSON event; skipped", path, offset)
                    event = None
                return path.name, offset + len(line), event
        return None

    def advance(self, url: str, name: str, offset: int, dropped: bool = False, delivered: bool = False) -> None:
        with self.lock:
            entry = self.hook_state(url, create=False)
            entry["cursor"][name] = offset
            if delivered:
                entry["delivered"] += 1
            if dropped:
                entry["dropped"] += 1
            self._save()

    def attempt(self, url: str, error: Optional[str]) -> None:
        """Remember how the last call went (for `appliance doctor`)."""
        with self.lock:
            entry = self.hook_state(url, create=False)
            if error is None:
                entry.update(failing=False, last_ok_at=time.time())
            else:
                entry.update(failing=True, last_error=error, last_error_at=time.time())
            self._save()

    # -- the main thread

    def start(self) -> "Deliverer":
        threading.Thread(target=self._main, name="notify", daemon=True).start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.poked.set()
        for w in self.workers.values():
            w.stop_event.set()

    def poke(self) -> None:
        """appliance.toml changed: follow [notify] now rather than at the next step."""
        self.poked.set()

    def _main(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - notifications must never take the controller down
                log.exception("notifications: a step failed; carrying on")
            self.poked.wait(STEP_S if self.workers else IDLE_STEP_S)
            self.poked.clear()

    def step(self) -> None:
        self._reload()
        self._compact()
        if time.monotonic() >= self.next_store_check:
            self.next_store_check = time.monotonic() + STORE_CHECK_S
            self._check_store()

    def _reload(self) -> None:
        """Follow [notify] in appliance.toml: one worker per webhook, restarted when it changes
        (a new one starts only once the old one has stopped, so no event goes out twice)."""
        from appliance.config import Config, ConfigError, load_config

        try:
            st = self.home.config_file.stat()
            sig = (st.st_mtime_ns, st.st_size)
        except OSError:
            sig = None
        if sig != self.config_sig or self.config is None:
            self.config_sig = sig
            try:
                self.config = load_config(self.home.config_file)
            except ConfigError as e:
                log.error("notifications: %s; keeping the last good [notify]", e)
                self.config = self.config or Config()
            with self.lock:
                wanted = {hook_id(h.url) for h in self.config.notify.webhooks}
                for hid in list(self.state["hooks"]):
                    if hid not in wanted:
                        del self.state["hooks"][hid]
                for h in self.config.notify.webhooks:
                    self.hook_state(h.url)
                self._save()
        notify = self.config.notify
        wanted = {hook_id(h.url): h for h in notify.webhooks}
        for hid, w in list(self.workers.items()):
            if hid not in wanted or (w.hook, w.tries, w.timeout) != (wanted[hid], notify.tries, notify.timeout):
                w.stop_event.set()
            if w.stop_event.is_set() and not w.is_alive():
                del self.workers[hid]
        for hid, h in wanted.items():
            if hid not in self.workers:
                self.workers[hid] = _Worker(self, h, notify.tries, notify.timeout)
                self.workers[hid].start()
                log.info("notifications to %s: events %s", shown(h.url), ", ".join(h.events))

    def _compact(self) -> None:
        """Empty spool files every webhook has read to the end (under the emitters' lock)."""
        for path in self._files():
            try:
                size = path.stat().st_size
                if size < COMPACT_BYTES:
                    continue
                with self.lock:
                    cursors = [e["cursor"].get(path.name, 0) for e in self.state["hooks"].values()]
                    if any(c < size for c in cursors):
                        continue
                    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        if not _lock(fd) or os.fstat(fd).st_size != size:
                            continue
                        os.ftruncate(fd, 0)
                        for e in self.state["hooks"].values():
                            e["cursor"][path.name] = 0
                        self._save()
                    finally:
                        os.close(fd)
            except OSError as e:
                log.warning("notifications: emptying %s: %s", path, e)

    def _check_store(self) -> None:
        """store_down / store_back, each once its new state held for two checks in a row."""
        config = self.config
        if config is None or not any(h.wants("store_down") or h.wants("store_back") for h in config.notify.webhooks):
            return
        from appliance.store.client import check_store
        from appliance.store.credentials import CredentialsError, load_credentials
        from appliance.store.server import StoreError, endpoint_url

        try:
            endpoint = endpoint_url(config)
            creds = load_credentials(self.home)
            problem = check_store(endpoint, creds.access_key, creds.secret_key, config.object_store.bucket,
                                  config.object_store.region)
        except (StoreError, CredentialsError) as e:
            endpoint, problem = "?", str(e)
        ok = problem is None
        confirmed = ok == self.store_seen
        self.store_seen = ok
        if not confirmed or ok == self.store_ok:
            return
        self.store_ok = ok
        if ok:
            emit(self.home, "controller", "store_back", f"the store at {endpoint} answers again", endpoint=endpoint)
        else:
            emit(self.home, "controller", "store_down", f"the store at {endpoint} is DOWN: {problem}",
                 endpoint=endpoint, reason=problem)


class _Worker(threading.Thread):
    """Delivers the spool to one webhook, one event at a time, in order."""

    def __init__(self, deliverer: Deliverer, hook, tries: int, timeout: float):
        super().__init__(name=f"notify-{hook_id(hook.url)}", daemon=True)
        self.d, self.hook, self.tries, self.timeout = deliverer, hook, tries, timeout
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                found = self.d.next_event(self.hook.url)
                if found is None:
                    self.stop_event.wait(0.5)
                    continue
                name, end, event = found
                if event is None or not self.hook.wants(str(event.get("event"))):
                    self.d.advance(self.hook.url, name, end)
                    continue
                outcome = self.deliver(event)
                if outcome is None:
                    return  # stopping mid-retry: the event stays unread for the next start
                self.d.advance(self.hook.url, name, end, delivered=outcome == "delivered",
                               dropped=outcome == "dropped")
            except Exception:  # noqa: BLE001
                log.exception("notifications to %s: carrying on", shown(self.hook.url))
                self.stop_event.wait(5.0)

    def deliver(self, event: dict) -> Optional[str]:
        """"delivered", "dropped" (after notify.tries), or None when told to stop meanwhile."""
        url, delay = self.hook.url, BACKOFF_FIRST_S
        for attempt in range(1, self.tries + 1):
            error = post(url, event, self.timeout)
            self.d.attempt(url, error)
            if error is None:
                if attempt > 1:
                    log.info("notification %s delivered to %s on try %d", event.get("event"), shown(url), attempt)
                return "delivered"
            if attempt == self.tries:
                log.error("notification %s to %s DROPPED after %d tries: %s (%s)", event.get("event"), shown(url),
                          self.tries, error, event.get("text", "")[:200])
                return "dropped"
            log.warning("notification %s to %s failed (try %d of %d): %s; again in %gs", event.get("event"),
                        shown(url), attempt, self.tries, error, delay)
            if self.stop_event.wait(delay):
                return None
            delay = min(delay * 2, BACKOFF_MAX_S)
        return "dropped"


def start(home) -> Deliverer:
    """The controller's delivery threads (they follow appliance.toml's [notify] by themselves)."""
    return Deliverer(home).start()


def doctor_rows(home, config) -> list[tuple[bool, str, str]]:
    """(ok, what, detail) per configured webhook, from how the controller's last call went."""
    try:
        state = json.loads((spool_dir(home) / STATE).read_text()).get("hooks", {})
    except (OSError, ValueError, AttributeError):
        state = {}
    rows = []
    for h in config.notify.webhooks:
        entry = state.get(hook_id(h.url)) or {}
        what = f"notify {shown(h.url)}"
        counts = f"{entry.get('delivered', 0)} delivered, {entry.get('dropped', 0)} dropped"
        if entry.get("failing"):
            when = time.strftime("%H:%M:%S", time.localtime(entry.get("last_error_at") or 0))
            rows.append((False, what, f"the last call failed at {when}: {entry.get('last_error')} ({counts}); "
                                      "check the URL and that the receiver is up and answers 2xx within "
                                      "notify.timeout (the controller's log has each try)"))
        elif entry:
            rows.append((True, what, counts))
        else:
            rows.append((True, what, "nothing sent yet (the controller delivers while the appliance runs)"))
    return rows
