"""In-process: GET /api/v1/usage, the 429 budget_exhausted on both surfaces, the setting.

`create_app(settings).test_client()` on the session's real redis-server (see
tests/app_tier.py); nothing here starts a generation (a refused start writes
nothing). Counting real streams is the gunicorn tier's (tests/test_usage.py).
"""

from __future__ import annotations

import hashlib
import time

import pytest

from config.settings import SettingsError, load_settings
from streaming.core import keys
from streaming.core.sessions import SessionStore
from streaming.core.usage import day_of, resets_at
from tests.app_tier import error_of

pytestmark = [pytest.mark.app, pytest.mark.timeout(30)]

USAGE = "/api/v1/usage"
STREAM = "/api/v1/completions/stream"
DETACHED = "/api/v1/completions"
V1 = "/v1/chat/completions"
K1 = {"Authorization": "Bearer k1"}
K2 = {"Authorization": "Bearer k2"}
KEY1 = "key:" + hashlib.sha256(b"k1").hexdigest()[:24]  # the owner of k1


def spend(app_redis, client: str, prompt: int, completion: int, generations: int = 1) -> None:
    app_redis.hset(
        keys.usage(client, day_of(time.time())),
        mapping={
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "generations": generations,
        },
    )


def test_usage_in_open_mode_without_a_budget(app_client):
    response = app_client.get(USAGE)
    assert response.status_code == 200
    body = response.get_json()
    now = time.time()
    assert body == {
        "day": day_of(now),
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "generations": 0,
        "budget": {"daily_tokens": None, "remaining": None, "resets_at": resets_at(now)},
    }
    assert list(body) == ["day", "prompt_tokens", "completion_tokens", "generations", "budget"]


def test_usage_counts_the_callers_ip_in_open_mode(make_app, app_redis):
    client = make_app(TOKEN_BUDGET_DAILY="1000").test_client()
    spend(app_redis, "127.0.0.1", 100, 50, 3)
    spend(app_redis, "10.1.1.1", 999, 999)
    body = client.get(USAGE).get_json()
    assert (body["prompt_tokens"], body["completion_tokens"], body["generations"]) == (100, 50, 3)
    assert body["budget"]["daily_tokens"] == 1000 and body["budget"]["remaining"] == 850


def test_remaining_is_never_negative(make_app, app_redis):
    client = make_app(TOKEN_BUDGET_DAILY="1000").test_client()
    spend(app_redis, "127.0.0.1", 800, 300)
    assert client.get(USAGE).get_json()["budget"]["remaining"] == 0


def test_each_key_sees_its_own_usage(make_app, app_redis):
    client = make_app(API_KEYS="k1,k2", TOKEN_BUDGET_DAILY="500").test_client()
    spend(app_redis, KEY1, 10, 20, 2)
    one = client.get(USAGE, headers=K1).get_json()
    two = client.get(USAGE, headers=K2).get_json()
    assert (one["prompt_tokens"], one["completion_tokens"], one["generations"]) == (10, 20, 2)
    assert one["budget"]["remaining"] == 470
    assert (two["prompt_tokens"], two["generations"], two["budget"]["remaining"]) == (0, 0, 500)
    response = client.get(USAGE)
    assert error_of(response) == (401, "unauthorized")
    assert error_of(client.get(USAGE, headers={"Authorization": "Bearer k3"}))[1] == "unauthorized"


@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT"])
def test_usage_is_read_only(app_client, method):
    assert error_of(app_client.open(USAGE, method=method)) == (405, "method_not_allowed")


def _assert_retry_after_until_midnight(response) -> None:
    retry = int(response.headers["Retry-After"])
    left = resets_at(time.time()) - time.time()
    assert 1 <= retry and abs(retry - left) <= 5, (retry, left)


@pytest.mark.parametrize("path", [STREAM, DETACHED])
def test_no_budget_left_is_429_budget_exhausted(make_app, app_redis, path):
    client = make_app(TOKEN_BUDGET_DAILY="1000").test_client()
    spend(app_redis, "127.0.0.1", 600, 400)
    response = client.post(path, json={"prompt": "hi"})
    assert error_of(response) == (429, "budget_exhausted")
    assert "1000" in response.get_json()["error"]["message"]
    _assert_retry_after_until_midnight(response)
    assert not list(app_redis.scan_iter("sluice:stream:*"))
    assert not list(app_redis.scan_iter("sluice:slots:*"))
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'sluice_rate_limit_rejections_total{code="budget_exhausted"}' in metrics


@pytest.mark.parametrize("stream", [True, False])
def test_no_budget_left_is_429_on_the_openai_surface(make_app, app_redis, stream):
    client = make_app(TOKEN_BUDGET_DAILY="1000").test_client()
    spend(app_redis, "127.0.0.1", 1000, 0)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    response = client.post(V1, json={**body, "stream": stream})
    assert response.status_code == 429
    error = response.get_json()["error"]
    assert (error["code"], error["type"]) == ("budget_exhausted", "rate_limit_error")
    _assert_retry_after_until_midnight(response)
    assert not list(app_redis.scan_iter("sluice:stream:*"))


def test_the_budget_is_per_key(make_app, app_redis):
    client = make_app(API_KEYS="k1,k2", TOKEN_BUDGET_DAILY="100").test_client()
    spend(app_redis, KEY1, 50, 50)
    assert error_of(client.post(STREAM, json={"prompt": "x"}, headers=K1)) == (
        429,
        "budget_exhausted",
    )
    # k2 has its whole budget: admission goes past the budget and is refused only by
    # the session's lease, checked after it in the same script (nothing starts here)
    session_id = client.post("/api/v1/sessions", headers=K2).get_json()["session_id"]
    app_redis.set(SessionStore.live_key(session_id), "st_" + "1" * 32, ex=60)
    response = client.post(STREAM, json={"prompt": "x", "session_id": session_id}, headers=K2)
    assert error_of(response) == (409, "session_busy")


def test_bad_input_is_still_a_400_when_the_budget_is_spent(make_app, app_redis):
    client = make_app(TOKEN_BUDGET_DAILY="10").test_client()
    spend(app_redis, "127.0.0.1", 10, 0)
    assert error_of(client.post(STREAM, json={"prompt": 5})) == (400, "invalid_request")


@pytest.mark.parametrize("value", ["0", "-5", "many", "1.5", "1e3"])
def test_a_bad_budget_setting_names_the_variable(value):
    with pytest.raises(SettingsError, match="TOKEN_BUDGET_DAILY"):
        load_settings({"TOKEN_BUDGET_DAILY": value})


def test_the_budget_setting():
    assert load_settings({}).token_budget_daily is None
    assert load_settings({"TOKEN_BUDGET_DAILY": ""}).token_budget_daily is None
    assert load_settings({"TOKEN_BUDGET_DAILY": "250000"}).token_budget_daily == 250_000
