"""Every upstream failure ends the stream with a typed `error` event, then `done`."""

from __future__ import annotations

import pytest

from devtools.harness import free_port
from tests.sse_client import EventStream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PATH = "/api/v1/completions/stream"


def ending(events):
    names = [e["event"] for e in events]
    assert names[0] == "start" and names[-2:] == ["error", "done"], names
    assert names.count("done") == 1
    assert events[-1]["data"]["reason"] == "error"
    return events[-2]["data"]["error"]["code"]


@pytest.mark.parametrize(
    ("directives", "code", "tokens_before"),
    [
        ("sim:fail=429 sim:retry_after=7", "upstream_rate_limited", 0),
        ("sim:fail=500", "upstream_error", 0),
        ("sim:fail=503", "upstream_error", 0),
        ("sim:fail=401", "upstream_error", 0),
        ("sim:tokens=20 sim:close_after=3", "upstream_error", 3),
        ("sim:tokens=20 sim:truncate_after=3", "upstream_error", 3),
        ("sim:tokens=20 sim:malformed_after=2", "upstream_error", 2),
        ("sim:tokens=20 sim:stall_after=2 sim:stall=30", "upstream_timeout", 2),  # timeout is 3 s
        ("sim:hang=30", "upstream_timeout", 0),
    ],
    ids=[
        "429",
        "500",
        "503",
        "401",
        "abrupt-close",
        "clean-but-truncated",
        "malformed",
        "stall",
        "no-first-byte",
    ],
)
def test_upstream_failure_is_error_then_done(
    sluice, simulator, tag, directives, code, tokens_before
):
    events = EventStream(sluice.base, PATH, {"prompt": f"x {directives} sim:tag={tag}"}).read_all()
    assert ending(events) == code
    text = "".join(e["data"]["token"] for e in events if e["event"] == "token")
    assert len(text.split(" ")) - 1 + text.count("\n") >= tokens_before
    assert simulator.record(tag, timeout=5)["state"] != "open"  # nothing left running upstream


def test_upstream_refused(make_sluice):
    server = make_sluice(workers=1, OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1")
    events = EventStream(server.base, PATH, {"prompt": "hello"}).read_all()
    assert ending(events) == "upstream_error"
    assert "unreachable" in events[-2]["data"]["error"]["message"]
