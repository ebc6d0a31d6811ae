"""In-process: CORS (CORS_ORIGINS), per-owner rate limits, failed authentications (§2)."""

from __future__ import annotations

import pytest

from tests.app_tier import error_of
from tests.jwks_server import hs256

pytestmark = [pytest.mark.app, pytest.mark.timeout(30)]

SESSIONS = "/api/v1/sessions"
STREAM = "/api/v1/completions/stream"
FRONT = "https://front.example"
SECRET = "s" * 32
K1 = {"Authorization": "Bearer key-one"}
K2 = {"Authorization": "Bearer key-two"}


def preflight(client, path: str, origin: str, method: str = "POST", headers: str = ""):
    request_headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        request_headers["Access-Control-Request-Headers"] = headers
    return client.options(path, headers=request_headers)


def allowed(response, name: str) -> set[str]:
    return {h.strip().lower() for h in response.headers.get(name, "").split(",") if h.strip()}


# -- CORS ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [{}, {"API_KEYS": "key-one"}], ids=["open", "authenticated"])
@pytest.mark.parametrize(
    "path", [SESSIONS, STREAM, f"{STREAM}/st_{'0' * 32}", "/v1/chat/completions"]
)
def test_preflight_from_a_listed_origin_is_204_without_credentials(make_app, app_redis, mode, path):
    client = make_app(CORS_ORIGINS=f"{FRONT},https://other.example", **mode).test_client()
    asked = "authorization, content-type, last-event-id, x-session-id"
    response = preflight(client, path, FRONT, "POST", asked)
    assert response.status_code == 204 and response.data == b""
    assert response.headers["Access-Control-Allow-Origin"] == FRONT
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert allowed(response, "Access-Control-Allow-Methods") == {"get", "post", "delete"}
    assert allowed(response, "Access-Control-Allow-Headers") == {
        "authorization",
        "content-type",
        "last-event-id",
        "x-session-id",
    }
    assert "Origin" in response.headers.get("Vary", "")
    # a preflight is no request of the caller's: no rate limit, no failed authentication
    assert not list(app_redis.scan_iter("sluice:rl*"))


def test_responses_expose_the_stream_and_limit_headers(make_app):
    client = make_app(API_KEYS="key-one", CORS_ORIGINS=FRONT).test_client()
    response = client.get(SESSIONS, headers={**K1, "Origin": FRONT})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == FRONT
    assert allowed(response, "Access-Control-Expose-Headers") == {
        "x-stream-id",
        "retry-after",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    }
    # errors carry them too, so a front end can read its 401 / 429
    response = client.get(SESSIONS, headers={"Origin": FRONT})
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == FRONT


def test_an_unlisted_origin_gets_no_cors_headers(make_app):
    client = make_app(API_KEYS="key-one", CORS_ORIGINS=FRONT).test_client()
    for origin in ("https://evil.example", "https://front.example.evil.example", "null"):
        response = preflight(client, SESSIONS, origin)
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Access-Control-Allow-Credentials" not in response.headers
        response = client.get(SESSIONS, headers={**K1, "Origin": origin})
        assert "Access-Control-Allow-Origin" not in response.headers


def test_without_cors_origins_no_cors_at_all(make_app):
    client = make_app(API_KEYS="key-one").test_client()
    response = preflight(client, SESSIONS, FRONT)
    assert "Access-Control-Allow-Origin" not in response.headers
    assert response.status_code != 401  # still no credential needed for OPTIONS


def test_star_allows_any_origin_without_credentials_but_listed_ones_keep_them(make_app):
    client = make_app(API_KEYS="key-one", CORS_ORIGINS=f"*,{FRONT}").test_client()
    response = preflight(client, SESSIONS, "https://anyone.example")
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "https://anyone.example")
    assert "Access-Control-Allow-Credentials" not in response.headers
    response = client.get(SESSIONS, headers={**K1, "Origin": "https://anyone.example"})
    assert "Access-Control-Allow-Credentials" not in response.headers
    response = preflight(client, SESSIONS, FRONT)
    assert response.headers["Access-Control-Allow-Origin"] == FRONT
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    only_star = make_app(API_KEYS="key-one", CORS_ORIGINS="*").test_client()
    response = preflight(only_star, SESSIONS, FRONT)
    assert response.status_code == 204
    assert "Access-Control-Allow-Credentials" not in response.headers


def test_malformed_ids_are_404_before_any_key(make_app, app_redis):
    client = make_app(API_KEYS="key-one").test_client()
    for bad in ("st_x", "st_" + "0" * 31 + "g", "x" * 300, "st_{a}b", "..", "st_%00"):
        for path in (f"{STREAM}/{bad}", f"{SESSIONS}/{bad.replace('st_', 'se_')}"):
            response = client.get(path, headers=K1)
            assert error_of(response) == (404, "not_found"), path
    assert not [k for k in app_redis.scan_iter("*") if not k.startswith(b"sluice:rl")]


# -- per-owner limits ------------------------------------------------------------------


def test_two_owners_behind_one_ip_have_their_own_buckets(make_app):
    client = make_app(
        API_KEYS="key-one,key-two", JWT_SECRET=SECRET, RATE_LIMIT_DEFAULT="3/minute"
    ).test_client()
    alice = {"Authorization": f"Bearer {hs256(SECRET, sub='alice')}"}
    bob = {"Authorization": f"Bearer {hs256(SECRET, sub='bob')}"}
    for headers in (K1, K2, alice, bob):
        assert [client.get(SESSIONS, headers=headers).status_code for _ in range(3)] == [200] * 3
        response = client.get(SESSIONS, headers=headers)
        assert error_of(response) == (429, "rate_limited")
        assert int(response.headers["Retry-After"]) > 0


def test_open_mode_counts_per_ip(make_app):
    client = make_app(RATE_LIMIT_DEFAULT="2/minute").test_client()
    assert client.post(SESSIONS, headers=K1).status_code == 201
    assert client.post(SESSIONS, headers=K2).status_code == 201  # ignored: same client IP
    assert error_of(client.post(SESSIONS))[1] == "rate_limited"
    other_ip = client.post(SESSIONS, environ_overrides={"REMOTE_ADDR": "198.51.100.7"})
    assert other_ip.status_code == 201


def test_the_cookie_counts_against_its_owner(make_app):
    client = make_app(API_KEYS="key-one,key-two", RATE_LIMIT_DEFAULT="3/minute").test_client()
    assert client.post("/api/v1/auth/session", headers=K1).status_code == 204  # 1 for key-one
    assert client.get(SESSIONS).status_code == 200  # cookie: key-one
    assert client.get(SESSIONS, headers=K1).status_code == 200
    assert error_of(client.get(SESSIONS))[1] == "rate_limited"
    assert client.get(SESSIONS, headers=K2).status_code == 200


# -- failed authentications ----------------------------------------------------------------


@pytest.fixture()
def guarded(make_app):
    return make_app(API_KEYS="key-one", JWT_SECRET=SECRET, RATE_LIMIT_AUTH_FAILURES="3/minute")


def test_failed_authentications_per_ip_then_429(guarded):
    client = guarded.test_client()
    wrong = [
        {"Authorization": "Bearer guess-1"},
        {"Authorization": f"Bearer {hs256('another-secret-of-enough-length!')}"},
        {"Authorization": "Basic a2V5LW9uZQ=="},
    ]
    for headers in wrong:
        assert error_of(client.get(SESSIONS, headers=headers)) == (401, "unauthorized")
    response = client.get(SESSIONS, headers={"Authorization": "Bearer guess-4"})
    assert error_of(response) == (429, "rate_limited")
    assert 0 < int(response.headers["Retry-After"]) <= 60
    # the valid key from that IP waits too: a guesser must not learn which guess was right
    assert error_of(client.get(SESSIONS, headers=K1)) == (429, "rate_limited")
    assert error_of(client.post("/api/v1/auth/session", headers=K1))[0] == 429
    assert client.get("/v1/models", headers=K1).status_code == 429
    # another IP is untouched
    other = client.get(SESSIONS, headers=K1, environ_overrides={"REMOTE_ADDR": "198.51.100.7"})
    assert other.status_code == 200


def test_failed_sign_ins_and_cookies_count_too(guarded):
    client = guarded.test_client()
    assert (
        client.post("/api/v1/auth/session", headers={"Authorization": "Bearer x"}).status_code
        == 401
    )
    client.set_cookie("sluice_session", "forged-1")
    assert client.get(SESSIONS).status_code == 401
    client.set_cookie("sluice_session", "forged-2")
    assert client.get("/api/v1/auth/session").status_code == 401
    assert error_of(client.get(SESSIONS, headers=K1)) == (429, "rate_limited")


def test_requests_without_any_credential_are_not_guesses(guarded):
    client = guarded.test_client()
    for _ in range(10):
        assert client.get("/api/v1/auth/session").status_code == 401  # "am I signed in?"
        assert client.get(SESSIONS).status_code == 401
    assert client.get(SESSIONS, headers=K1).status_code == 200


def test_open_mode_counts_no_failures(make_app):
    client = make_app(RATE_LIMIT_AUTH_FAILURES="1/minute").test_client()
    for _ in range(5):
        assert client.get(SESSIONS.replace("sessions", "usage"), headers=K1).status_code == 200


def test_a_valid_bearer_asking_for_a_cookie_is_no_failure(guarded):
    client = guarded.test_client()
    for _ in range(5):
        assert client.get("/api/v1/auth/session", headers=K1).status_code == 401
    assert client.get(SESSIONS, headers=K1).status_code == 200
