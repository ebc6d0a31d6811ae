"""In-process: browser sign-in (/api/v1/auth/session), the cookie, the Origin check (§2).

The cookie is read by the test client as a browser would store it; the
sign-in itself lives in Redis under the digest of the cookie's value.
"""

from __future__ import annotations

import time

import pytest

from tests.app_tier import error_of
from tests.jwks_server import hs256

pytestmark = [pytest.mark.app, pytest.mark.timeout(30)]

AUTH = "/api/v1/auth/session"
SESSIONS = "/api/v1/sessions"
SECRET = "s" * 32
KEY = {"Authorization": "Bearer key-one"}
SAME = {"Origin": "http://localhost"}  # the test client's own origin


@pytest.fixture()
def authed(make_app):
    return make_app(
        API_KEYS="key-one,key-two",
        JWT_SECRET=SECRET,
        CORS_ORIGINS="https://front.example",
        AUTH_SESSION_TTL_SECONDS="3600",
    )


def sign_in(client, headers=KEY, **kw):
    response = client.post(AUTH, headers=headers, **kw)
    assert response.status_code == 204, response.data
    return response


def cookie_value(client) -> str:
    return client.get_cookie("sluice_session").value


def test_sign_in_with_a_key_sets_the_cookie_and_stores_only_a_digest(authed, app_redis):
    client = authed.test_client()
    response = sign_in(client)
    (header,) = response.headers.getlist("Set-Cookie")
    attributes = [part.strip() for part in header.split(";")]
    assert attributes[0].startswith("sluice_session=")
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes[1:])
    assert "Secure" not in attributes  # plain HTTP, no trusted proxy
    value = cookie_value(client)
    assert len(value) >= 43  # 256 random bits
    body = client.get(AUTH).get_json()
    assert body["owner_kind"] == "key"
    assert abs(body["expires"] - (time.time() + 3600)) < 5
    # Redis holds the digest of the value, never the value or the key
    (key,) = app_redis.scan_iter("sluice:signin:*")
    assert value.encode() not in key and 3590 <= app_redis.ttl(key) <= 3600
    for k in app_redis.scan_iter("*"):
        assert value.encode() not in k
        if app_redis.type(k) == b"string":
            assert value.encode() not in app_redis.get(k) and b"key-one" not in app_redis.get(k)


def test_the_cookie_owns_like_the_bearer_on_api_routes(authed):
    client = authed.test_client()
    mine = client.post(SESSIONS, headers=KEY).get_json()["session_id"]
    sign_in(client)
    assert client.get(f"{SESSIONS}/{mine}").status_code == 200  # same owner as the key
    listed = client.get(SESSIONS).get_json()["sessions"]
    assert [s["session_id"] for s in listed] == [mine]
    created = client.post(SESSIONS, headers=SAME)
    assert created.status_code == 201
    other = authed.test_client()
    other_key = {"Authorization": "Bearer key-two"}
    assert client.get(f"{SESSIONS}/{created.get_json()['session_id']}").status_code == 200
    assert error_of(other.get(f"{SESSIONS}/{mine}", headers=other_key)) == (404, "not_found")


def test_v1_takes_bearer_credentials_only(authed):
    client = authed.test_client()
    sign_in(client)
    response = client.get("/v1/models")
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/v1/models", headers=KEY).status_code == 200


def test_sign_in_with_a_jwt_ends_at_its_exp(authed, app_redis):
    client = authed.test_client()
    exp = int(time.time()) + 120
    sign_in(client, headers={"Authorization": f"Bearer {hs256(SECRET, exp=exp)}"})
    body = client.get(AUTH).get_json()
    assert body["owner_kind"] == "jwt" and body["expires"] <= exp
    (key,) = app_redis.scan_iter("sluice:signin:*")
    assert 0 < app_redis.ttl(key) <= 120  # not AUTH_SESSION_TTL_SECONDS (3600)
    # a token inside its leeway (valid for requests) is past its exp: no sign-in
    late = hs256(SECRET, exp=int(time.time()) - 10)
    assert (
        authed.test_client().get(SESSIONS, headers={"Authorization": f"Bearer {late}"}).status_code
        == 200
    )
    response = client.post(AUTH, headers={"Authorization": f"Bearer {late}"})
    assert error_of(response) == (401, "unauthorized")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": "key-one"}, {"Cookie": "x=y"}],
    ids=["none", "wrong", "no-scheme", "cookie-only"],
)
def test_sign_in_needs_a_valid_bearer(authed, app_redis, headers):
    client = authed.test_client()
    response = client.post(AUTH, headers=headers)
    assert error_of(response) == (401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "Set-Cookie" not in response.headers
    assert not list(app_redis.scan_iter("sluice:signin:*"))


def test_sign_out_revokes_at_once(authed, app_redis):
    client = authed.test_client()
    sign_in(client)
    value = cookie_value(client)
    response = client.delete(AUTH, headers=SAME)
    assert response.status_code == 204
    assert "Max-Age=0" in response.headers["Set-Cookie"]
    assert not list(app_redis.scan_iter("sluice:signin:*"))
    # the old value, replayed: refused everywhere, and the browser is told to forget it
    client.set_cookie("sluice_session", value)
    response = client.get(AUTH)
    assert error_of(response) == (401, "unauthorized")
    assert "Max-Age=0" in response.headers["Set-Cookie"]
    client.set_cookie("sluice_session", value)
    assert error_of(client.get(SESSIONS)) == (401, "unauthorized")
    assert client.delete(AUTH, headers=SAME).status_code == 204  # signing out again: no harm
    assert error_of(client.delete(AUTH, headers=SAME)) == (401, "unauthorized")  # no cookie left


def test_not_signed_in(authed):
    client = authed.test_client()
    assert error_of(client.get(AUTH)) == (401, "unauthorized")
    client.set_cookie("sluice_session", "forged-value")
    assert error_of(client.get(AUTH)) == (401, "unauthorized")
    client.set_cookie("sluice_session", "x" * 3000)
    assert error_of(client.get(SESSIONS)) == (401, "unauthorized")


def test_secure_behind_a_trusted_https_proxy(make_app):
    proxied = make_app(API_KEYS="key-one", TRUSTED_PROXIES="1").test_client()
    https = {**KEY, "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    assert "Secure" in sign_in(proxied, headers=https).headers["Set-Cookie"]
    assert "Secure" not in sign_in(proxied).headers["Set-Cookie"]
    # without a trusted proxy the header is anyone's to send: not believed
    direct = make_app(API_KEYS="key-one").test_client()
    assert "Secure" not in sign_in(direct, headers=https).headers["Set-Cookie"]


def test_open_mode_has_no_sign_in(app_client):
    for method in ("GET", "POST", "DELETE"):
        response = app_client.open(AUTH, method=method, headers=KEY)
        assert error_of(response) == (404, "not_found")


# -- the Origin check of cookie-authenticated writes --------------------------------


def _write(client, method: str, origin: str | None, extra: dict | None = None):
    headers = {} if origin is None else {"Origin": origin}
    if method == "POST":
        return client.post(SESSIONS, headers={**headers, **(extra or {})})
    return client.delete(f"{SESSIONS}/se_{'0' * 32}", headers={**headers, **(extra or {})})


@pytest.mark.parametrize("method", ["POST", "DELETE"])
@pytest.mark.parametrize(
    "origin",
    [
        None,
        "null",
        "https://evil.example",
        "http://localhost.evil.example",
        "https://localhost",
        "http://localhost:8080",
        "*",
    ],
)
def test_cookie_writes_from_another_origin_are_403(authed, app_redis, method, origin):
    client = authed.test_client()
    sign_in(client)
    assert error_of(_write(client, method, origin)) == (403, "forbidden_origin")
    assert not list(app_redis.scan_iter("sluice:session:*"))


@pytest.mark.parametrize(
    "origin", ["http://localhost", "https://front.example", "HTTP://LOCALHOST"]
)
def test_cookie_writes_from_the_own_or_a_listed_origin(authed, origin):
    client = authed.test_client()
    sign_in(client)
    assert _write(client, "POST", origin).status_code == 201
    assert error_of(_write(client, "DELETE", origin)) == (404, "not_found")


def test_sign_out_is_origin_checked(authed, app_redis):
    client = authed.test_client()
    sign_in(client)
    assert error_of(client.delete(AUTH, headers={"Origin": "https://evil.example"}))[1] == (
        "forbidden_origin"
    )
    assert error_of(client.delete(AUTH)) == (403, "forbidden_origin")
    assert list(app_redis.scan_iter("sluice:signin:*"))  # still signed in
    assert client.delete(AUTH, headers={"Origin": "https://front.example"}).status_code == 204


def test_star_never_counts_for_the_origin_check(make_app):
    client = make_app(API_KEYS="key-one", CORS_ORIGINS="*").test_client()
    sign_in(client)
    assert error_of(_write(client, "POST", "https://any.example")) == (403, "forbidden_origin")
    assert _write(client, "POST", "http://localhost").status_code == 201


def test_reads_and_bearer_writes_need_no_origin(authed):
    client = authed.test_client()
    sign_in(client)
    assert client.get(SESSIONS).status_code == 200  # a cookie read
    fresh = authed.test_client()
    assert _write(fresh, "POST", "https://evil.example", KEY).status_code == 201  # bearer


def test_same_origin_follows_the_trusted_proxy_scheme(make_app):
    client = make_app(API_KEYS="key-one", TRUSTED_PROXIES="1").test_client()
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    sign_in(client, headers={**KEY, **https})
    assert _write(client, "POST", "https://localhost", https).status_code == 201
    assert error_of(_write(client, "POST", "http://localhost", https))[1] == "forbidden_origin"
