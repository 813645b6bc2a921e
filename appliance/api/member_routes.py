"""Members' own store identity: GET /v1/me/store (made on first use), POST /v1/users (admin)."""

from __future__ import annotations

from appliance.api.members import MemberStoreError, Store, member_store
from appliance.api.protocol import StoreAccess, UserAddRequest, UserInfo
from appliance.api.routes import ApiError, Request, route


def store_of(req: Request, uid: int, name: str) -> Store:
    try:
        return member_store(req.home, req.config, uid, name)
    except MemberStoreError as e:
        raise ApiError(503, str(e)) from None


@route("GET", "/v1/me/store", who="member")
def my_store(req: Request) -> StoreAccess:
    s = store_of(req, req.caller.uid, req.caller.name)
    return StoreAccess(endpoint=s.endpoint, region=s.region, bucket=s.bucket, access_key=s.access_key,
                       secret_key=s.secret_key, private=s.private)


@route("POST", "/v1/users", who="admin")
def add_user(req: Request) -> UserInfo:
    import pwd

    body = UserAddRequest.from_json(req.body or {})
    try:
        account = pwd.getpwnam(body.name)
    except KeyError:
        raise ApiError(404, f"no local account named {body.name!r}: make it first (sudo useradd {body.name})") from None
    s = store_of(req, account.pw_uid, account.pw_name)
    return UserInfo(name=account.pw_name, uid=account.pw_uid, bucket=s.bucket)
