"""The whole chat surface through /v1 (issue 17), driven by real clients (real gunicorn, Redis).

Each test sends the same request through Sluice and straight to the simulator
and compares what the client makes of both (ids and ``created`` aside): the
openai SDK (streaming through its ``.stream()`` helper, and not), LangChain's
``ChatOpenAI.bind_tools``, and a whole tool loop. Then: every forwarded field
reaches the upstream as sent, and a /v1 generation that ends in tool calls is
cancelled, resumed and accounted like any other.
"""

from __future__ import annotations

import functools
import json
import operator
from typing import Any

import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI

from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MODEL = "gpt-4o-mini"
STREAM = "/api/v1/completions/stream"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def get_weather(city: str, unit: str) -> str:
    return json.dumps({"city": city, "temperature": 21, "unit": unit})


@pytest.fixture()
def both(sluice, simulator):
    """(through Sluice, straight to the simulator): two SDK clients."""
    with (
        openai.OpenAI(base_url=sluice.base + "/v1", api_key="x", max_retries=0) as via,
        openai.OpenAI(base_url=simulator.v1, api_key="x", max_retries=0) as direct,
    ):
        yield via, direct


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def same_choice(a, b) -> dict[str, Any]:
    """The choices of two answers (ids and created aside) are equal; returns one."""
    left, right = a.choices[0].model_dump(), b.choices[0].model_dump()
    assert left == right
    assert a.usage == b.usage  # None when a stream did not ask for it
    assert a.model == b.model and a.object == b.object
    return left


def final_of_stream(client: openai.OpenAI, **kwargs: Any):
    """The SDK's own accumulation of a streamed answer (``chat.completions.stream``)."""
    with client.chat.completions.stream(**kwargs) as stream:
        events = list(stream)
        return stream.get_final_completion(), events


def snapshot_of_stream(client: openai.OpenAI, **kwargs: Any):
    """The SDK's accumulation without its parsing (which raises on content_filter)."""
    with client.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        return stream.current_completion_snapshot


# -- the openai SDK ------------------------------------------------------------------------


def test_sdk_non_streaming_tool_call_is_the_upstreams(both):
    via, direct = both
    args = {"model": MODEL, "messages": user("What is the weather in Paris?"), "tools": [WEATHER]}
    mine, theirs = via.chat.completions.create(**args), direct.chat.completions.create(**args)
    choice = same_choice(mine, theirs)
    assert mine.id.startswith("st_") and choice["finish_reason"] == "tool_calls"
    message = mine.choices[0].message
    assert message.content is None and message.refusal is None
    (call,) = message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_sdk_streaming_tool_call_is_the_upstreams(both):
    via, direct = both
    args = {
        "model": MODEL,
        "messages": user("Weather please, in Oslo"),
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "stream_options": {"include_usage": True},
    }
    mine, events = final_of_stream(via, **args)
    theirs, _ = final_of_stream(direct, **args)
    choice = same_choice(mine, theirs)
    assert choice["finish_reason"] == "tool_calls"
    (call,) = mine.choices[0].message.tool_calls
    assert call.function.parsed_arguments == {"city": "Oslo", "unit": "celsius"}
    # name first, then the arguments in fragments, as the upstream sent them
    fragments = [
        e.arguments_delta for e in events if e.type == "tool_calls.function.arguments.delta"
    ]
    assert len(fragments) > 2 and "".join(fragments) == call.function.arguments
    chunks = [e.chunk for e in events if e.type == "chunk"]
    first = next(c for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    head = first.choices[0].delta.tool_calls[0]
    assert (head.index, head.id, head.type) == (0, call.id, "function")
    assert head.function.name == "get_weather" and head.function.arguments == ""
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("st_")


def test_sdk_json_stop_and_logprobs_are_the_upstreams(both):
    via, direct = both
    cases = [
        {"response_format": {"type": "json_object"}, "messages": user("json please sim:tokens=9")},
        {"stop": ["some"], "seed": 7, "messages": user("stop me sim:tokens=30")},
        {"logprobs": True, "top_logprobs": 2, "messages": user("probs sim:tokens=6")},
    ]
    for case in cases:
        args = {"model": MODEL, **case}
        choice = same_choice(
            via.chat.completions.create(**args), direct.chat.completions.create(**args)
        )
        streamed = same_choice(final_of_stream(via, **args)[0], final_of_stream(direct, **args)[0])
        assert streamed["message"]["content"] == choice["message"]["content"]
        assert streamed["logprobs"] == choice["logprobs"]
    json_answer = via.chat.completions.create(model=MODEL, **cases[0])
    assert json.loads(json_answer.choices[0].message.content)["answer"]
    stopped = via.chat.completions.create(model=MODEL, **cases[1]).choices[0]
    assert stopped.finish_reason == "stop" and "some" not in stopped.message.content
    probs = via.chat.completions.create(model=MODEL, **cases[2]).choices[0]
    tokens = [t.token for t in probs.logprobs.content]
    assert "".join(tokens) == probs.message.content and len(tokens) == 6
    assert all(len(t.top_logprobs) == 2 for t in probs.logprobs.content)


def test_refusal_and_content_filter_are_the_upstreams(both):
    via, direct = both
    for prompt in ("do bad things sim:refuse=1", "filtered sim:tokens=5 sim:finish=content_filter"):
        args = {"model": MODEL, "messages": user(prompt)}
        same_choice(via.chat.completions.create(**args), direct.chat.completions.create(**args))
        same_choice(snapshot_of_stream(via, **args), snapshot_of_stream(direct, **args))
    refused = via.chat.completions.create(model=MODEL, messages=user("x sim:refuse=1"))
    assert refused.choices[0].message.refusal and refused.choices[0].message.content is None
    chunks = list(
        via.chat.completions.create(
            model=MODEL, messages=user("x sim:tokens=3 sim:finish=content_filter"), stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "content_filter"


# -- LangChain -----------------------------------------------------------------------------


def chat_model(base_url: str) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL, base_url=base_url, api_key="x", max_retries=0, timeout=20, stream_usage=True
    )


def langchain_view(message) -> dict[str, Any]:
    return {
        "content": message.content,
        "tool_calls": message.tool_calls,
        "finish_reason": message.response_metadata.get("finish_reason"),
        "usage": message.usage_metadata,
    }


def test_langchain_bind_tools_is_the_upstreams(sluice, simulator):
    prompt = [HumanMessage("What's the weather like in Lisbon?")]
    via = chat_model(sluice.base + "/v1").bind_tools([WEATHER, TIME])
    direct = chat_model(simulator.v1).bind_tools([WEATHER, TIME])
    mine, theirs = via.invoke(prompt), direct.invoke(prompt)
    assert langchain_view(mine) == langchain_view(theirs)
    (call,) = mine.tool_calls
    assert (call["name"], call["args"]) == ("get_weather", {"city": "Lisbon", "unit": "celsius"})
    streamed = functools.reduce(operator.add, via.stream(prompt))
    direct_streamed = functools.reduce(operator.add, direct.stream(prompt))
    assert langchain_view(streamed) == langchain_view(direct_streamed)
    assert streamed.tool_calls == mine.tool_calls


def test_langchain_tool_loop_is_the_upstreams(sluice, simulator):
    def loop(base_url: str) -> list[Any]:
        llm = chat_model(base_url).bind_tools([WEATHER])
        history: list[Any] = [HumanMessage("Weather in Rome?")]
        history.append(llm.invoke(history))
        for call in history[-1].tool_calls:
            history.append(ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"]))
        history.append(llm.invoke(history))
        return history

    mine, theirs = loop(sluice.base + "/v1"), loop(simulator.v1)
    assert [langchain_view(m) for m in mine[1::2]] == [langchain_view(m) for m in theirs[1::2]]
    answer = mine[-1]
    assert answer.response_metadata["finish_reason"] == "stop" and not answer.tool_calls
    assert '"city": "Rome"' in answer.content and "21" in answer.content


# -- a whole tool loop with the SDK --------------------------------------------------------


def run_tool_loop(client: openai.OpenAI, stream: bool) -> list[dict[str, Any]]:
    """model -> tool call -> our tool's result -> the model's answer; every choice seen."""
    messages: list[dict[str, Any]] = [
        {"role": "developer", "content": "Use the tools."},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather in Kyoto?"}]},
    ]
    seen = []
    for _ in range(3):
        args = {"model": MODEL, "messages": messages, "tools": [WEATHER], "seed": 3}
        if stream:
            answer = final_of_stream(client, **args)[0]
        else:
            answer = client.chat.completions.create(**args)
        choice = answer.choices[0]
        seen.append(choice.model_dump())
        if choice.finish_reason != "tool_calls":
            return seen
        calls = [
            c.model_dump(include={"id", "type", "function"}) for c in choice.message.tool_calls
        ]
        for call in calls:
            call["function"].pop("parsed_arguments", None)
        messages.append({"role": "assistant", "content": None, "tool_calls": calls})
        for call in calls:
            result = get_weather(**json.loads(call["function"]["arguments"]))
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    raise AssertionError(f"no answer after three rounds: {seen}")


@pytest.mark.parametrize("stream", [False, True])
def test_full_tool_loop_is_the_upstreams(both, stream):
    via, direct = both
    mine, theirs = run_tool_loop(via, stream), run_tool_loop(direct, stream)
    assert mine == theirs
    assert [c["finish_reason"] for c in mine] == ["tool_calls", "stop"]
    assert "Kyoto" in mine[-1]["message"]["content"] and "21" in mine[-1]["message"]["content"]


# -- the pass-through rule -----------------------------------------------------------------


def test_every_field_reaches_the_upstream_as_sent(both, simulator, tag):
    via, _ = both
    fields = {
        "tools": [WEATHER],
        "tool_choice": "none",
        "parallel_tool_calls": False,
        "response_format": {"type": "text"},
        "stop": ["zzz"],
        "seed": 11,
        "user": "user-42",
        "temperature": 1,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"1234": -5},
        "logprobs": False,
        "reasoning_effort": "low",
        "metadata": {"purpose": "test"},
        "n": 1,
        "max_completion_tokens": 50,
    }
    future = {"a_field_openai_adds_later": {"nested": [1, "two"]}}
    via.chat.completions.create(
        model=MODEL, messages=user(f"all the fields sim:tag={tag}"), extra_body=future, **fields
    )
    sent = simulator.record(tag)["request"]
    assert {k: sent[k] for k in fields} == fields
    assert sent["a_field_openai_adds_later"] == future["a_field_openai_adds_later"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert "max_tokens" not in sent  # each cap as the client named it
    assert sent["messages"] == user(f"all the fields sim:tag={tag}")


# -- cancel, resume and usage for a /v1 generation ending in tool calls ---------------------


def native_events(base: str, stream_id: str, after: int = 0) -> list[dict]:
    stream = EventStream(base, f"{STREAM}/{stream_id}", method="GET", headers={
        "Last-Event-ID": str(after)
    })  # fmt: skip
    assert stream.status == 200
    return stream.read_all()


def test_native_api_sees_a_tool_call_generation_text_only(sluice, tag):
    body = {
        "model": MODEL,
        "messages": user(f"Weather in Lima sim:rate=10 sim:tag={tag}"),
        "tools": [WEATHER],
        "stream": True,
    }
    v1 = EventStream(sluice.base, "/v1/chat/completions", body)
    assert v1.status == 200
    stream_id = v1.stream_id
    live = native_events(sluice.base, stream_id)  # followed live, on either worker
    assert [e["event"] for e in live] == ["start", "done"]
    done = live[-1]["data"]
    assert done["reason"] == "tool_calls" and done["usage"]["estimated"] is False
    assert done["metadata"]["token_count"] > 2  # the name and the argument fragments
    assert int(live[0]["id"]) == 1 and int(live[-1]["id"]) > 2  # the delta events' ids skipped
    text = v1.resp.read().decode()
    v1.close()
    assert '"tool_calls"' in text and text.endswith("data: [DONE]\n\n")
    replay = native_events(sluice.base, stream_id)  # finished: replayed from the event log
    assert [(e["id"], e["event"]) for e in replay] == [(e["id"], e["event"]) for e in live]
    status, _, _ = request(
        sluice.base, "GET", f"{STREAM}/{stream_id}", headers={"Last-Event-ID": live[-1]["id"]}
    )
    assert status == 204


def test_delete_cancels_a_tool_call_stream_with_estimated_usage(sluice, simulator, tag):
    with openai.OpenAI(base_url=sluice.base + "/v1", api_key="x", max_retries=0) as client:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=user(f"Weather in Quito sim:rate=2 sim:tag={tag}"),
            tools=[WEATHER],
            stream=True,
        )
        chunks = [next(stream), next(stream)]
        assert chunks[1].choices[0].delta.tool_calls[0].function.name == "get_weather"
        stream_id = chunks[0].id
        status, _, body = request(sluice.base, "DELETE", f"{STREAM}/{stream_id}")
        assert (status, body["status"]) == (200, "cancelled")
        with pytest.raises(openai.APIError) as info:
            list(stream)
    assert info.value.code == "cancelled"
    assert simulator.record(tag, timeout=5)["state"] == "client_closed"
    done = native_events(sluice.base, stream_id)[-1]["data"]
    assert done["reason"] == "cancelled"
    usage = done["usage"]  # the upstream sent none: estimated, the tool call's text counted
    assert usage["estimated"] is True and usage["completion_tokens"] >= 1
    assert usage["prompt_tokens"] >= 1


def test_an_upstream_refusing_a_forwarded_field_says_why(both):
    via, _ = both
    with pytest.raises(openai.InternalServerError) as info:
        via.chat.completions.create(model=MODEL, messages=user("x sim:fail=400"), seed=1)
    error = info.value
    assert (error.status_code, error.code) == (502, "upstream_error")
    assert error.body["message"] == "The model provider answered HTTP 400: Simulated error 400."
    with pytest.raises(openai.APIError) as info:
        list(via.chat.completions.create(model=MODEL, messages=user("x sim:fail=422"), stream=True))
    assert "HTTP 422: Simulated error 422." in info.value.message
