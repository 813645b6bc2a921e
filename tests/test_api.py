"""The appliance's API: its types, its route table, who may call what, and the real daemon under
supervisord answering root, members and outsiders (real accounts, the real CLI through runuser)."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from dataclasses import dataclass, field

import pytest

from appliance.api import access
from appliance.api.protocol import Caller, Message, ProtocolError
from appliance.api.routes import ApiError, match, route
from tests.appliance_fixtures import make_home

# ------------------------------------------------------------------------------------ types


@dataclass(frozen=True)
class Sample(Message):
    name: str
    count: int = 0
    ratio: float = 1.0
    tags: list[str] = field(default_factory=list)
    extra: dict | None = None


@pytest.mark.parametrize("body, problem", [
    ([], "must be a JSON object"),
    ({}, "missing field 'name'"),
    ({"name": "x", "owner": "bob"}, "unknown field 'owner'"),
    ({"name": 3}, "'name' must be text"),
    ({"name": "x", "count": "3"}, "'count' must be a whole number"),
    ({"name": "x", "count": True}, "'count' must be a whole number, not true/false"),
    ({"name": "x", "tags": "a,b"}, "'tags' must be a list"),
    ({"name": "x", "tags": ["a", 2]}, "'tags[1]' must be text"),
    ({"name": "x", "extra": []}, "'extra' must be an object"),
])
def test_a_body_of_the_wrong_shape_is_one_line_naming_the_field(body, problem):
    with pytest.raises(ProtocolError) as err:
        Sample.from_json(body)
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_types_round_trip_through_json():
    s = Sample(name="x", count=2, ratio=3, tags=["a"], extra=None)
    again = Sample.from_json(json.loads(json.dumps(s.to_json())))
    assert again == Sample(name="x", count=2, ratio=3.0, tags=["a"])
    assert isinstance(again.ratio, float)
    caller = Caller(uid=1000, gid=1000, pid=5, name="ann", groups=[1000, 997], member=True)
    assert Caller.from_json(caller.to_json()) == caller


# ------------------------------------------------------------------------------------ routes


def test_routes_match_by_method_and_path_with_parameters():
    @route("GET", "/v9/things/{key}", who="anyone")
    def thing(req):
        return {"key": req.params["key"]}

    found, params = match("GET", "/v9/things/abc-1")
    assert found.handler is thing and params == {"key": "abc-1"}
    with pytest.raises(ApiError) as err:
        match("DELETE", "/v9/things/abc")
    assert err.value.status == 405
    with pytest.raises(ApiError) as err:
        match("GET", "/v9/things/a/b")
    assert err.value.status == 404
    with pytest.raises(ValueError):
        route("GET", "/v9/things/{key}")(thing)  # twice


# ------------------------------------------------------------------------------------ policy

NOT_IN_GROUP = "you are not in group appliance; ask an admin: sudo usermod -aG appliance ann"


@pytest.mark.parametrize("who, mode, admin, in_group, refused", [
    ("anyone", "closed", False, False, None),
    ("member", "group", False, True, None),
    ("member", "group", False, False, NOT_IN_GROUP),
    ("submit", "group", False, False, NOT_IN_GROUP),
    ("submit", "open", False, False, None),
    ("member", "open", False, False, None),
    ("submit", "closed", False, True, "submitting is closed"),
    ("member", "closed", False, True, None),  # members still follow what they submitted
    ("submit", "closed", False, False, NOT_IN_GROUP),
    ("submit", "closed", True, False, None),
    ("admin", "open", False, True, "this needs an admin"),
    ("admin", "group", True, False, None),
])
def test_who_may_call_what_under_each_queue_mode(who, mode, admin, in_group, refused):
    said = access.refusal(who, mode, "ann", admin, in_group)
    if refused is None:
        assert said is None
    else:
        assert said is not None and said.startswith(refused)


@pytest.mark.parametrize("uid, groups, admin_gid, admin", [
    (0, [0], None, True), (1000, [1000], None, False), (1000, [1000, 50], 50, True), (1000, [1000], 50, False)])
def test_admins_are_root_or_the_admin_group(uid, groups, admin_gid, admin):
    assert access.is_admin(uid, groups, admin_gid) is admin


@pytest.mark.parametrize("caller, admin, owner, may", [
    (1000, False, 1000, True), (1000, False, 1001, False), (1000, False, None, False),
    (0, True, 1001, True), (0, True, None, True)])
def test_a_member_acts_on_their_own_an_admin_on_all(caller, admin, owner, may):
    assert access.may_act_on(caller, admin, owner) is may


# ------------------------------------------------------------------------------------ the daemon


def _raw(home, data: bytes) -> tuple[int, dict]:
    """Send `data` on the API socket; (status, JSON body)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(home.home.run_dir / "api.sock"))
    s.sendall(data)
    reply = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
        if b"\r\n\r\n" in reply:
            head, _, body = reply.partition(b"\r\n\r\n")
            length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
            if length and len(body) >= length[0]:
                break
    s.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_the_socket_is_root_and_the_groups_alone(lab):
    home, _ = lab
    import grp

    st = os.stat(home.home.run_dir / "api.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, grp.getgrnam("appliance").gr_gid)


def test_status_for_root_and_members_through_the_api(lab):
    home, users = lab
    root_facts = home.status()
    assert root_facts["running"] and root_facts["slots"]
    member = users["alice"].cli("status", "--json")
    assert member.returncode == 0, member.stderr
    facts = json.loads(member.stdout)
    assert facts["running"] is True  # a member used to read "not running": supervisord's socket is root's
    assert [s["name"] for s in facts["slots"]] == [s["name"] for s in root_facts["slots"]]
    text = users["bob"].cli("status")
    assert text.returncode == 0 and "running (supervisord pid" in text.stdout, text.stderr
    log = (home.home.logs_dir / "api.log").read_text()
    assert f"{users['alice'].name}(uid {users['alice'].uid}" in log  # the kernel said who called


def test_the_api_knows_the_caller_from_the_kernel(lab):
    home, users = lab
    code = ("from appliance.api.client import Client; from appliance.paths import Home; import json, os;"
            f"print(json.dumps(Client(Home.at({str(home.root)!r})).get('/v1/whoami')))")
    out = users["alice"].python(code)
    assert out.returncode == 0, out.stderr
    me = json.loads(out.stdout)
    assert (me["uid"], me["name"], me["admin"], me["member"]) == (users["alice"].uid, users["alice"].name, False, True)


def test_an_outsider_gets_one_clear_line(lab):
    _, users = lab
    eve = users["eve"]
    out = eve.cli("status")
    assert out.returncode != 0
    assert out.stderr.strip() == (f"appliance: you are not in group appliance (the appliance at "
                                  f"{eve.appliance_root} refused you); ask an admin: sudo usermod -aG appliance "
                                  f"{eve.name} (then log in again)"), out.stderr


def test_up_and_down_as_a_member_need_root_and_change_nothing(lab):
    home, users = lab
    pid = home.status()["supervisord_pid"]
    for action in ("down", "up"):
        out = users["alice"].cli(action)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert f"`{action}` needs root" in out.stderr and f"sudo appliance {action}" in out.stderr
    facts = home.status()
    assert facts["running"] and facts["supervisord_pid"] == pid


@pytest.mark.parametrize("request_bytes, status, words", [
    (b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such API path"),
    (b"GET /v0/status HTTP/1.1\r\nHost: x\r\n\r\n", 404, "/v1/"),
    (b"POST /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405, "use GET"),
    (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{nope", 400, "not JSON"),
    (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n[1]", 400, "JSON object"),
    (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "Content-Length"),
    (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n", 413, "limit"),
    (b"BREW /v1/status HTTP/1.1\r\nHost: x\r\n\r\n", 501, "Unsupported method"),
    (b"POST /v1/submit HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 400, "missing field 'queue'"),
    (b"POST /v1/submit HTTP/1.1\r\nHost: x\r\nContent-Length: 32\r\n\r\n{\"queue\": 5, \"request\": {}}     ", 400,
     "'queue' must be text"),
    (b"POST /v1/submit HTTP/1.1\r\nHost: x\r\nContent-Length: 35\r\n\r\n{\"queue\": \"local_x\", \"request\": {}}", 400,
     "the request cannot run"),
    (b"POST /v1/submit HTTP/1.1\r\nHost: x\r\nContent-Length: 42\r\n\r\n{\"queue\": \"../etc\", \"request\": {}, \"x\": 1}", 400,
     "unknown field 'x'"),
    (b"POST /v1/users HTTP/1.1\r\nHost: x\r\nContent-Length: 24\r\n\r\n{\"name\": \"no-such-user\"}", 404,
     "no local account"),
])
def test_every_malformed_request_gets_an_error_status_and_one_line(lab, request_bytes, status, words):
    home, _ = lab
    got, body = _raw(home, request_bytes)
    assert got == status and words in body["error"] and "\n" not in body["error"], body


def test_a_restart_of_the_api_program_is_survived_by_its_clients(lab):
    home, users = lab
    from appliance import supervisor

    server = supervisor.rpc(home.home)
    server.supervisor.stopProcess("api", True)
    assert (home.home.run_dir / "api.sock").exists()  # the path stays while the program is away
    server.supervisor.startProcess("api", False)  # its socket comes back while the client retries
    out = users["alice"].cli("status", "--json")
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 30
    while supervisor.processes(home.home)["api"].state != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_stopped_appliance_is_one_line(lab_users, tmp_path_factory):
    home = make_home(tmp_path_factory.mktemp("stopped"))
    home.home.ensure()
    os.chmod(home.root, 0o755)
    alice = lab_users["alice"]
    running_root, alice.appliance_root = alice.appliance_root, home.root
    try:
        out = alice.cli("status")
    finally:
        alice.appliance_root = running_root
    assert out.returncode != 0
    assert out.stderr.strip() == (f"appliance: appliance is not running at {home.root} (no API socket): ask an "
                                  "admin to run 'sudo appliance up'"), out.stderr
    root = home.cli("status", check=False)  # root reads the home itself
    assert root.returncode == 0 and "not running" in root.stdout
