"""POST /api/v1/completions/stream through real gunicorn (2 gevent workers), Redis, simulator."""

from __future__ import annotations

import openai
import pytest

from tests.sse_client import EventStream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PATH = "/api/v1/completions/stream"


def test_event_sequence_and_headers(sluice, simulator, tag):
    stream = EventStream(sluice.base, PATH, {"prompt": f"hello sim:tag={tag} sim:tokens=40"})
    events = stream.read_all()
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream"
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert stream.stream_id.startswith("st_") and len(stream.stream_id) == 35

    names = [e["event"] for e in events]
    assert names[0] == "start" and names[-1] == "done"
    assert set(names[1:-1]) == {"token"}
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert all(e["data"]["type"] == e["event"] for e in events)

    start, done = events[0]["data"], events[-1]["data"]
    assert start["stream_id"] == stream.stream_id
    assert start["model"] == "gpt-4o-mini" and start["session_id"] is None
    assert done["finished"] is True and done["reason"] == "stop"
    assert done["usage"] == {
        "prompt_tokens": done["usage"]["prompt_tokens"],
        "completion_tokens": 40,
        "estimated": False,
    }
    assert done["metadata"]["token_count"] == 40
    assert (
        done["metadata"]["ttft_ms"] > 0
        and done["metadata"]["elapsed_ms"] >= done["metadata"]["ttft_ms"]
    )

    tokens = [e["data"] for e in events if e["event"] == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    text = "".join(t["token"] for t in tokens)
    assert "\n" in text  # the simulator sends newline tokens: frames must survive them
    assert simulator.record(tag)["state"] == "completed"


def test_same_text_as_the_upstream_sends(sluice, simulator, tag):
    prompt = f"determinism sim:tokens=33 sim:tag={tag}"
    direct = openai.OpenAI(base_url=simulator.v1, api_key="x", max_retries=0)
    expected = (
        direct.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
        )
        .choices[0]
        .message.content
    )
    direct.close()
    events = EventStream(sluice.base, PATH, {"prompt": prompt}).read_all()
    assert "".join(e["data"]["token"] for e in events if e["event"] == "token") == expected


def test_a_paced_upstream_is_relayed_in_batches_with_the_same_text(make_sluice, simulator):
    # 30 tokens at 50/s take ~600 ms; with 200 ms relay pauses they leave in a few events.
    server = make_sluice(workers=2, RELAY_INTERVAL_MS="200")
    prompt = "paced sim:tokens=30 sim:rate=50 sim:delay=0"
    direct = openai.OpenAI(base_url=simulator.v1, api_key="x", max_retries=0)
    messages = [{"role": "user", "content": prompt}]
    expected = direct.chat.completions.create(model="gpt-4o-mini", messages=messages)
    direct.close()
    events = EventStream(server.base, PATH, {"prompt": prompt}).read_all()
    tokens = [e["data"] for e in events if e["event"] == "token"]
    assert "".join(t["token"] for t in tokens) == expected.choices[0].message.content
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert 1 <= len(tokens) <= 8, len(tokens)  # one per upstream chunk would be 30
    assert events[-1]["data"]["metadata"]["token_count"] == 30


def test_an_upstream_slower_than_the_interval_is_relayed_token_by_token(make_sluice):
    # 2 tokens/s: each token comes 500 ms after the last, well past the 100 ms pause,
    # so each leaves on its own instead of waiting for company.
    server = make_sluice(workers=2, RELAY_INTERVAL_MS="100")
    prompt = "slow sim:tokens=4 sim:rate=2 sim:delay=0"
    events = EventStream(server.base, PATH, {"prompt": prompt}).read_all()
    tokens = [e["data"] for e in events if e["event"] == "token"]
    assert len(tokens) == 4, tokens
    assert events[-1]["data"]["metadata"]["token_count"] == 4


def test_max_tokens_ends_with_length(sluice):
    events = EventStream(
        sluice.base, PATH, {"prompt": "x sim:tokens=50", "max_tokens": 5}
    ).read_all()
    assert events[-1]["data"]["reason"] == "length"
    assert events[-1]["data"]["metadata"]["token_count"] == 5


def test_messages_and_model_are_passed(sluice, simulator, tag):
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": f"hi sim:tag={tag} sim:tokens=3"},
        ],
        "model": "gpt-4o",
        "temperature": 0.2,
    }
    events = EventStream(sluice.base, PATH, body).read_all()
    assert events[0]["data"]["model"] == "gpt-4o"
    record = simulator.record(tag)
    assert record["model"] == "gpt-4o" and record["messages_count"] == 2


def test_heartbeat_from_the_first_byte_while_waiting_for_the_first_token(sluice, tag):
    # heartbeat is 1 s in this server; the first token comes after 2.5 s
    stream = EventStream(
        sluice.base, PATH, {"prompt": f"slow sim:delay=2.5 sim:tokens=2 sim:tag={tag}"}
    )
    first = stream.next_event()
    assert first["event"] == "start"
    token = stream.until("token")
    assert stream.pings >= 2, stream.text
    assert stream.text.index(": ping") < stream.text.index("event: token")
    assert token["data"]["index"] == 0
    assert stream.read_all()[-1]["data"]["reason"] == "stop"


def test_heartbeat_during_a_silent_upstream(sluice, tag):
    stream = EventStream(
        sluice.base,
        PATH,
        {"prompt": f"s sim:tokens=4 sim:stall_after=1 sim:stall=2.2 sim:tag={tag}"},
    )
    events = stream.read_all()
    assert stream.pings >= 1
    assert events[-1]["data"]["reason"] == "stop"
