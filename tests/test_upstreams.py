"""Several upstreams (API.md section 11): routing, failover before the first token, the breaker.

Real processes: two named simulators (``--name primary`` / ``--name backup``,
so ``sim:primary.fail=503`` fails on the primary alone), a port where nothing
listens (a dead upstream: connections are refused), gunicorn with 2 gevent
workers and an ``UPSTREAMS_FILE``, the openai SDK as the /v1 client. Each
failure kind fails over, and the TTFT it adds is measured against the same
request served without a failure (printed; docs/RELIABILITY.md has figures).
"""

from __future__ import annotations

import json
import secrets
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from devtools.harness import Simulator, free_port, get_json, wait_for
from streaming.core import keys
from tests.sse_client import EventStream, request
from tests.test_metrics_logs import scrape
from tests.test_upstream_proxy import proxied_requests, proxy  # noqa: F401 (its fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PATH = "/api/v1/completions/stream"
KEY = "k-upstreams"
AUTH = {"Authorization": f"Bearer {KEY}"}
SIM_ARGS = ("--tokens", "20", "--rate", "200", "--delay", "0.05")


def upstreams_toml(*entries: dict) -> str:
    out = []
    for entry in entries:
        out.append("[[upstream]]")
        for name, value in entry.items():
            if isinstance(value, dict):
                pairs = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items())
                out.append(f"{name} = {{ {pairs} }}")
            else:
                out.append(f"{name} = {json.dumps(value)}")
        out.append("")
    return "\n".join(out)


def write_upstreams(tmp_path_factory, *entries: dict) -> str:
    path = tmp_path_factory.mktemp("upstreams") / "upstreams.toml"
    path.write_text(upstreams_toml(*entries))
    return str(path)


def entry(name: str, url: str, models: list[str], **extra) -> dict:
    return {"name": name, "base_url": url, "api_key_env": "SIM_KEY", "models": models, **extra}


@pytest.fixture(scope="module")
def sims():
    primary = Simulator("--name", "primary", *SIM_ARGS).start()
    backup = Simulator("--name", "backup", *SIM_ARGS).start()
    yield primary, backup
    primary.stop()
    backup.stop()


@pytest.fixture(scope="module")
def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: connections are refused


@pytest.fixture(scope="module")
def server(make_sluice, sims, dead_url, tmp_path_factory):
    """gpt-4o-mini: primary, backup; gpt-4o: a dead upstream, backup; sim-fast: backup only,
    under another name. The breaker is out of the way (threshold 1000): failover alone here."""
    primary, backup = sims
    suffix = secrets.token_hex(3)  # breaker state in Redis is per upstream name
    path = write_upstreams(
        tmp_path_factory,
        entry("primary", primary.v1, ["gpt-4o-mini"]),
        entry(f"dead-{suffix}", dead_url, ["gpt-4o"]),
        entry(
            "backup",
            backup.v1,
            ["gpt-4o-mini", "gpt-4o", "sim-fast"],
            model_map={"sim-fast": "provider/sim-fast"},
        ),
    )
    return make_sluice(
        workers=2,
        UPSTREAMS_FILE=path,
        SIM_KEY="sk-sim",
        ALLOWED_MODELS="",  # empty counts as unset: the union of the upstreams' models
        API_KEYS=KEY,
        UPSTREAM_HEAD_TIMEOUT_SECONDS="0.5",
        UPSTREAM_FAILURE_THRESHOLD="1000",
    )


def stream(server, prompt: str, model: str | None = None) -> list[dict]:
    body = {"prompt": prompt, **({"model": model} if model else {})}
    return EventStream(server.base, PATH, body, headers=AUTH).read_all()


def text_of(events: list[dict]) -> str:
    return "".join(e["data"]["token"] for e in events if e["event"] == "token")


def done_of(events: list[dict]) -> dict:
    names = [e["event"] for e in events]
    assert names[0] == "start" and names.count("done") == 1 and names[-1] == "done", names
    return events[-1]["data"]


def ttft(server, prompt: str, model: str | None = None, runs: int = 3) -> float:
    """Median time to first token (ms, as the done event reports it) over a few runs."""
    return statistics.median(
        done_of(stream(server, f"{prompt} sim:tag=ttft-{secrets.token_hex(4)}", model))["metadata"][
            "ttft_ms"
        ]
        for _ in range(runs)
    )


FAILURES = {
    "refused": ("gpt-4o", ""),  # the dead upstream lists gpt-4o first
    "500": ("gpt-4o-mini", "sim:primary.fail=500"),
    "503": ("gpt-4o-mini", "sim:primary.fail=503"),
    "429": ("gpt-4o-mini", "sim:primary.fail=429 sim:primary.retry_after=5"),
    "no-head": ("gpt-4o-mini", "sim:primary.hang=5"),  # head timeout 0.5 s here
    "break-before-first-delta": ("gpt-4o-mini", "sim:primary.close_after=0"),
    "truncated-before-first-delta": ("gpt-4o-mini", "sim:primary.truncate_after=0"),
    "bad-chunk-before-first-delta": ("gpt-4o-mini", "sim:primary.malformed_after=0"),
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_each_failure_kind_fails_over_before_the_first_token(server, sims, kind, tag):
    primary, backup = sims
    model, fault = FAILURES[kind]
    prompt = f"failover {kind} sim:tokens=15"
    started = time.monotonic()
    events = stream(server, f"{prompt} {fault} sim:tag={tag}", model)
    took = time.monotonic() - started
    done = done_of(events)
    assert done["reason"] == "stop", events[-2:]
    first = done["metadata"]["failed_over"][0]
    assert (done["metadata"]["upstream"], len(done["metadata"]["failed_over"])) == ("backup", 1)
    assert first == ("primary" if model == "gpt-4o-mini" else first) and first != "backup"
    # the answer is the backup's, whole (the same text every simulator gives this prompt)
    assert backup.record(tag)["state"] == "completed"
    assert len(text_of(events).split(" ")) - 1 + text_of(events).count("\n") >= 15
    if model == "gpt-4o-mini":
        assert primary.record(tag, timeout=5)["state"] != "open"  # closed, not left running
    baseline = ttft(server, prompt + " sim:primary.delay=0.05", "gpt-4o-mini")
    added = done["metadata"]["ttft_ms"] - baseline
    print(f"\nfailover {kind}: TTFT {done['metadata']['ttft_ms']:.1f} ms, +{added:.1f} ms")
    limit = 500 + 1500 if kind == "no-head" else 1000  # the head timeout, or milliseconds
    assert added < limit and took < 10


def test_no_failover_after_the_first_token(server, sims, tag):
    primary, backup = sims
    events = stream(server, f"x sim:tokens=20 sim:primary.close_after=3 sim:tag={tag}")
    done = done_of(events)
    assert done["reason"] == "error" and events[-2]["data"]["error"]["code"] == "upstream_error"
    assert done["metadata"]["upstream"] == "primary" and done["metadata"]["failed_over"] == []
    assert text_of(events)  # the client had the primary's first tokens: no second answer
    assert primary.record(tag)["state"] == "aborted"
    status, _ = get_json(f"{backup.base}/_sim/requests/{tag}")
    assert status == 404  # the backup was never asked


def test_model_routing_and_model_map(server, sims, tag):
    primary, backup = sims
    events = stream(server, f"mapped sim:tokens=5 sim:tag={tag}", "sim-fast")
    assert events[0]["data"]["model"] == "sim-fast"  # the client's name, in Sluice's fields
    assert done_of(events)["metadata"]["upstream"] == "backup"
    assert backup.record(tag)["model"] == "provider/sim-fast"  # the upstream's name for it
    assert get_json(f"{primary.base}/_sim/requests/{tag}")[0] == 404
    # file order: gpt-4o-mini goes to the primary first, unmapped
    events = stream(server, f"first sim:tokens=5 sim:tag={tag}-mini", "gpt-4o-mini")
    assert done_of(events)["metadata"] == {
        **done_of(events)["metadata"],
        "upstream": "primary",
        "failed_over": [],
    }
    assert primary.record(f"{tag}-mini")["model"] == "gpt-4o-mini"
    # the allowed models are the union of the upstreams' (ALLOWED_MODELS empty = unset)
    with openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0) as client:
        assert [m.id for m in client.models.list()] == ["gpt-4o-mini", "gpt-4o", "sim-fast"]
        answer = client.chat.completions.create(
            model="sim-fast", messages=[{"role": "user", "content": "hi sim:tokens=3"}]
        )
        assert answer.model == "sim-fast"
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="gpt-4.1-mini", messages=[{"role": "user", "content": "hi"}]
            )
        assert info.value.code == "model_not_allowed"


def test_everything_down_is_upstream_unavailable(server, sims, tag):
    both = "sim:primary.fail=503 sim:backup.fail=500"
    events = stream(server, f"x {both} sim:tag={tag}")
    done = done_of(events)
    error = events[-2]["data"]["error"]
    assert error["code"] == "upstream_unavailable" and "backup" in error["message"]
    assert "HTTP 500" in error["message"]  # the last failure, named
    assert done["reason"] == "error" and done["metadata"]["failed_over"] == ["primary", "backup"]
    assert done["metadata"]["upstream"] is None
    with openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0) as client:
        messages = [{"role": "user", "content": f"x {both}"}]
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        assert (info.value.status_code, info.value.code) == (503, "upstream_unavailable")
        with pytest.raises(openai.APIError) as info:
            for _ in client.chat.completions.create(
                model="gpt-4o-mini", messages=messages, stream=True
            ):
                pass
        assert info.value.code == "upstream_unavailable"


# -- the rest of the API on failed-over generations --------------------------------------


def test_v1_streaming_and_tools_on_a_failed_over_generation(server, sims, tag):
    primary, backup = sims
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    with openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0) as client:
        messages = [
            {"role": "user", "content": f"weather in Paris sim:primary.fail=502 sim:tag={tag}"}
        ]
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=messages,
                tools=tools,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert all(c.model == "gpt-4o-mini" for c in chunks)
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
        assert calls[0].function.name == "weather"
        args = "".join(tc.function.arguments or "" for tc in calls)
        assert json.loads(args) == {"city": "Paris"}
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        assert chunks[-1].usage.completion_tokens > 0
        assert backup.record(tag)["state"] == "completed"
        assert primary.record(tag)["state"] == "failed"
        # non-streaming, text
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "user", "content": f"hi sim:tokens=7 sim:primary.fail=500 sim:tag={tag}-n"}
            ],
        )
        answer = raw.parse()
        assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens == 7
        assert backup.record(f"{tag}-n")["state"] == "completed"


def test_cancel_resume_and_usage_on_a_failed_over_generation(server, sims, tag):
    primary, backup = sims
    before = request(server.base, "GET", "/api/v1/usage", headers=AUTH)[2]
    # resume: the stream is replayed from the event log with the same ids, done included
    events = stream(server, f"r sim:tokens=9 sim:primary.fail=503 sim:tag={tag}-r")
    sid = events[0]["data"]["stream_id"]
    replay = EventStream(
        server.base, f"{PATH}/{sid}", method="GET", headers={**AUTH, "Last-Event-ID": "1"}
    ).read_all()
    assert [e["id"] for e in replay] == [e["id"] for e in events[1:]]
    assert replay[-1]["data"]["metadata"]["failed_over"] == ["primary"]
    # usage counts the backup's answer once; the failed attempt costs nothing
    done = events[-1]["data"]
    assert done["usage"]["estimated"] is False and done["usage"]["completion_tokens"] == 9
    after = wait_for(
        lambda: (
            (u := request(server.base, "GET", "/api/v1/usage", headers=AUTH)[2])["generations"]
            > before["generations"]
            and u
        ),
        5,
        "usage counted",
    )
    assert after["generations"] == before["generations"] + 1
    assert after["completion_tokens"] == before["completion_tokens"] + 9
    # cancel: a failed-over stream is stopped wherever it runs, its backup request closed
    live = EventStream(
        server.base,
        PATH,
        {"prompt": f"c sim:tokens=9999 sim:rate=30 sim:primary.fail=500 sim:tag={tag}-c"},
        headers=AUTH,
    )
    live.until("token")
    status, _, out = request(server.base, "DELETE", f"{PATH}/{live.stream_id}", headers=AUTH)
    assert (status, out["status"]) == (200, "cancelled")
    done = live.read_all()[-1]["data"]
    assert done["reason"] == "cancelled" and done["metadata"]["failed_over"] == ["primary"]
    assert backup.record(f"{tag}-c", timeout=5)["state"] == "client_closed"


def test_metrics_carry_the_upstream(server, sims):
    stream(server, "m sim:tokens=3 sim:primary.fail=500")
    m = scrape(server.base)
    assert (
        m[("sluice_upstream_errors_total", (("code", "upstream_error"), ("upstream", "primary")))]
        >= 1
    )
    assert m[("sluice_generations_total", (("reason", "stop"), ("upstream", "backup")))] >= 1
    assert m[("sluice_time_to_first_token_seconds_count", (("upstream", "backup"),))] >= 1
    assert m[("sluice_tokens_relayed_total", (("upstream", "backup"),))] >= 3
    assert m[("sluice_upstream_breaker_state", (("upstream", "primary"),))] == 0
    assert m[("sluice_upstream_breaker_state", (("upstream", "backup"),))] == 0


# -- the breaker, shared by two servers ---------------------------------------------------


def _breaker(redis_client, name: str) -> dict[str, int]:
    raw = redis_client.hgetall(keys.breaker(name))
    return {k.decode(): int(v) for k, v in raw.items()}


def test_breaker_is_shared_by_two_servers_then_probes_once(
    make_sluice, redis_client, sims, tmp_path_factory
):
    _, backup = sims
    port = free_port()
    name = f"flaky-{secrets.token_hex(3)}"
    path = write_upstreams(
        tmp_path_factory,
        entry(name, f"http://127.0.0.1:{port}/v1", ["gpt-4o-mini"]),
        entry("backup", backup.v1, ["gpt-4o-mini"]),
    )
    env = {
        "UPSTREAMS_FILE": path,
        "SIM_KEY": "sk-sim",
        "API_KEYS": KEY,
        "UPSTREAM_FAILURE_THRESHOLD": "2",
        "UPSTREAM_COOLDOWN_SECONDS": "2",
    }
    one, two = make_sluice(workers=2, **env), make_sluice(workers=2, **env)

    def metadata(server, prompt="b sim:tokens=3"):
        events = stream(server, prompt)
        done = done_of(events)
        assert done["reason"] == "stop", events[-2:]
        return done["metadata"]["upstream"], done["metadata"]["failed_over"]

    # two failures (one on each server) open it for every worker of both
    assert metadata(one) == ("backup", [name])
    assert _breaker(redis_client, name) == {"fails": 1}
    assert metadata(two) == ("backup", [name])
    state = _breaker(redis_client, name)
    assert state["fails"] == 2 and state["until"] > time.time() * 1000
    # skipped while open, on both servers (and not listed in failed_over)
    for server in (one, two, one, two):
        assert metadata(server) == ("backup", [])
    assert scrape(one.base)[("sluice_upstream_breaker_state", (("upstream", name),))] == 1

    # cooled down: a burst over both servers, exactly one request probes (and fails)
    wait_for(lambda: time.time() * 1000 > state["until"], 10, "the cooldown to pass")
    assert scrape(two.base)[("sluice_upstream_breaker_state", (("upstream", name),))] == 2
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: metadata((one, two)[i % 2]), range(16)))
    assert sorted(r[1] for r in results) == [[]] * 15 + [[name]]
    reopened = _breaker(redis_client, name)
    assert reopened["until"] >= state["until"] + 2000  # a full cooldown again

    # the upstream comes back: after the cooldown the probe succeeds and closes it
    revived = Simulator("--name", name, *SIM_ARGS, "--port", str(port)).start()
    try:
        wait_for(lambda: time.time() * 1000 > reopened["until"], 10, "the cooldown to pass")
        assert metadata(two) == (name, [])
        assert _breaker(redis_client, name) == {}
        assert [metadata((one, two)[i % 2])[0] for i in range(4)] == [name] * 4
    finally:
        revived.stop()


# -- egress proxies, per upstream ---------------------------------------------------------


def test_each_upstream_takes_the_proxy_its_url_gets(
    make_sluice,
    sims,
    proxy,  # noqa: F811 (the tinyproxy fixture of tests/test_upstream_proxy.py)
    tmp_path_factory,
    tag,
):
    """HTTP_PROXY for the primary (127.0.0.1), NO_PROXY for the backup (localhost)."""
    primary, backup = sims
    url, log = proxy
    backup_direct = backup.v1.replace("127.0.0.1", "localhost")
    path = write_upstreams(
        tmp_path_factory,
        entry("primary", primary.v1, ["gpt-4o-mini"]),
        entry("backup", backup_direct, ["gpt-4o-mini"]),
    )
    server = make_sluice(
        workers=2,
        UPSTREAMS_FILE=path,
        SIM_KEY="x",
        API_KEYS=KEY,
        HTTP_PROXY=url,
        NO_PROXY="localhost",
        UPSTREAM_FAILURE_THRESHOLD="1000",
    )
    before = proxied_requests(log)
    events = stream(server, f"p sim:tokens=4 sim:primary.fail=503 sim:tag={tag}")
    assert done_of(events)["metadata"]["failed_over"] == ["primary"]
    assert primary.record(tag)["state"] == "failed"  # reached, through the proxy
    assert backup.record(tag)["state"] == "completed"  # reached directly
    wait_for(lambda: proxied_requests(log) > before, 5, "the primary's request in the log")
    events = stream(server, f"q sim:tokens=4 sim:primary.fail=503 sim:tag={tag}-2")
    assert done_of(events)["metadata"]["upstream"] == "backup"
    wait_for(lambda: proxied_requests(log) >= before + 2, 5, "the second primary request")
    assert proxied_requests(log) == before + 2  # the backup's two never went through it
