"""The web chat page (GET /) in a real browser against real gunicorn, Redis and the simulator.

Each test leaves a screenshot in tests/artifacts/<test name>.png (also when it fails).
Nothing sleeps: every wait is a Playwright expectation or wait_for_function with a deadline.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import Page, Route, expect

from devtools.simulator import parse_directives, tokens_for
from tests.browser import ARTIFACTS, chromium
from tests.sse_client import EventStream

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(120)]

STREAM = "/api/v1/completions/stream"
WAIT_MS = 30_000
expect.set_options(timeout=WAIT_MS)

# the text of the newest assistant message, as it arrived (the page renders it as Markdown)
ANSWER_TEXT = """() => {
  const all = document.querySelectorAll('[data-testid="assistant-message"]');
  const last = all[all.length - 1];
  if (!last) return "";
  const text = last.querySelector('[data-testid="assistant-text"]');
  return text.markdownSource ?? text.textContent;  // the Markdown as it arrived (rendered as HTML)
}"""
# resolves with the answer's length once it is longer than n
LONGER_THAN = f"n => {{ const l = ({ANSWER_TEXT})().length; return l > n ? l : 0; }}"


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def new_page(browser, request, **context_options) -> Page:
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 800}, **context_options})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.uncaught = []  # exceptions thrown by the page's own script
    page.on("pageerror", lambda exc: page.uncaught.append(exc))
    page.on("dialog", lambda dialog: page.uncaught.append(f"unexpected dialog: {dialog.message}"))
    request.addfinalizer(lambda: _finish(page, request.node.name))
    return page


def _finish(page: Page, name: str) -> None:
    try:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    finally:
        page.context.close()


@pytest.fixture()
def page(browser, request) -> Page:
    return new_page(browser, request)


def open_chat(page: Page, base: str) -> None:
    page.goto(base + "/")
    expect(page.get_by_test_id("prompt")).to_be_visible()


def send(page: Page, text: str) -> None:
    page.get_by_test_id("prompt").fill(text)
    page.get_by_test_id("send").click()


def answer(page: Page):
    return page.get_by_test_id("assistant-message").last


def answer_text(page: Page) -> str:
    return page.evaluate(ANSWER_TEXT)


def wait_longer_than(page: Page, n: int) -> int:
    return page.wait_for_function(LONGER_THAN, arg=n, timeout=WAIT_MS).json_value()


def expected_text(prompt: str) -> str:
    """What the simulator streams for a prompt that is the first message of its conversation."""
    opts, text = parse_directives(prompt)
    return "".join(tokens_for(text, opts["tokens"]))


def log_requests(page: Page) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    page.on("request", lambda req: seen.append((req.method, req.url)))
    return seen


def no_page_errors(page: Page) -> None:
    assert page.uncaught == []
    expect(page.locator('[data-state="error"]')).to_have_count(0)


def sessions_api_exists(base: str) -> bool:
    req = urllib.request.Request(
        base + "/api/v1/sessions",
        data=b'{"title": "probe"}',
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            session_id = json.loads(resp.read())["session_id"]
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return False
        raise
    delete = urllib.request.Request(f"{base}/api/v1/sessions/{session_id}", method="DELETE")
    urllib.request.urlopen(delete, timeout=10).close()
    return True


# 1 -------------------------------------------------------------------------------------------
def test_tokens_arrive_incrementally(sluice, page):
    prompt = "Tell me about rivers sim:tokens=120 sim:rate=30"
    open_chat(page, sluice.base)
    send(page, prompt)
    expect(page.get_by_test_id("user-message").last).to_have_text(prompt)
    expect(page.get_by_test_id("stop")).to_be_visible()

    lengths = [wait_longer_than(page, 0)]
    expect(answer(page)).to_have_attribute("data-state", "streaming")
    for _ in range(4):
        lengths.append(wait_longer_than(page, lengths[-1]))

    expect(answer(page)).to_have_attribute("data-state", "done")
    expect(answer(page).get_by_test_id("message-status")).to_contain_text("Done")
    final = answer_text(page)
    assert lengths == sorted(set(lengths)) and lengths[-1] < len(final), (lengths, len(final))
    assert final == expected_text(prompt)
    expect(page.get_by_test_id("send")).to_be_visible()
    expect(page.get_by_test_id("stop")).to_be_hidden()
    no_page_errors(page)


# 2 -------------------------------------------------------------------------------------------
def test_stop_button_cancels_the_stream(sluice, simulator, page, tag):
    requests = log_requests(page)
    open_chat(page, sluice.base)
    send(page, f"A very long story sim:tokens=3000 sim:rate=30 sim:tag={tag}")
    wait_longer_than(page, 20)

    page.get_by_test_id("stop").click()
    expect(answer(page)).to_have_attribute("data-state", "stopped")
    expect(answer(page)).to_have_attribute("data-reason", "cancelled")
    expect(answer(page).get_by_test_id("message-status")).to_have_text(re.compile("Stopped"))
    expect(page.get_by_test_id("stop")).to_be_hidden()
    text_at_stop = answer_text(page)

    stream_id = page.evaluate("() => window.__sluice.state().streamId")
    assert ("DELETE", f"{sluice.base}{STREAM}/{stream_id}") in requests
    # the upstream request was closed early ...
    record = simulator.record(tag)
    assert record["state"] == "client_closed" and record["tokens_sent"] < 3000, record
    # ... and the page shows exactly what the finished stream holds: nothing more can come
    with EventStream(sluice.base, f"{STREAM}/{stream_id}", method="GET") as replay:
        events = replay.read_all()
    assert events[-1]["event"] == "done" and events[-1]["data"]["reason"] == "cancelled"
    assert "".join(e["data"]["token"] for e in events if e["event"] == "token") == text_at_stop
    assert answer_text(page) == text_at_stop
    no_page_errors(page)


# 3 -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graceful_sluice(make_sluice):
    """A generation outlives its client by 10 s, so that a resume can find it still running."""
    return make_sluice(workers=2, DISCONNECT_GRACE_SECONDS="10")


def test_dropped_connection_resumes_and_finishes(graceful_sluice, page):
    prompt = "Explain the tides to me sim:tokens=150 sim:rate=40"
    open_chat(page, graceful_sluice.base)
    send(page, prompt)  # the reference: the same prompt, streamed without a drop
    expect(answer(page)).to_have_attribute("data-state", "done")
    reference = answer_text(page)
    assert reference == expected_text(prompt)

    page.get_by_test_id("new-chat").click()  # a fresh conversation: same prompt, same text
    expect(page.get_by_test_id("assistant-message")).to_have_count(0)
    requests = log_requests(page)
    send(page, prompt)
    wait_longer_than(page, 30)
    assert page.evaluate("() => window.__sluiceDropConnection()") is True
    length_at_drop = len(answer_text(page))

    expect(answer(page)).to_have_attribute("data-state", "done")
    expect(answer(page).get_by_test_id("message-status")).to_contain_text("Done")
    final = answer_text(page)
    assert final == reference  # nothing lost, nothing duplicated
    assert length_at_drop < len(final)

    state = page.evaluate("() => window.__sluice.state()")
    assert state["resumes"] >= 1 and state["active"] is False
    resumed = [
        url
        for method, url in requests
        if method == "GET" and f"{STREAM}/{state['streamId']}?last_event_id=" in url
    ]
    assert resumed and int(resumed[0].rsplit("=", 1)[1]) > 1, requests
    assert not [r for r in requests if r[0] == "DELETE"], requests  # a drop is not a cancel
    no_page_errors(page)


# 4 -------------------------------------------------------------------------------------------
def test_reload_shows_the_session_history(sluice, page):
    if not sessions_api_exists(sluice.base):
        pytest.xfail("sessions API not implemented yet")
    prompt = "Remember this river sim:tokens=40"
    open_chat(page, sluice.base)
    send(page, prompt)
    expect(answer(page)).to_have_attribute("data-state", "done")
    reply = answer_text(page)
    expect(page.get_by_test_id("session")).to_have_count(1)

    page.reload()
    expect(page.get_by_test_id("user-message")).to_have_count(1)
    expect(page.get_by_test_id("user-text")).to_have_text(prompt)
    expect(page.get_by_test_id("assistant-text")).to_have_text(reply)
    expect(page.get_by_test_id("session")).to_have_count(1)
    expect(page.get_by_test_id("sidebar-note")).to_be_empty()
    no_page_errors(page)


def test_expired_session_starts_a_new_chat(sluice, page):
    if not sessions_api_exists(sluice.base):
        pytest.xfail("sessions API not implemented yet")
    open_chat(page, sluice.base)
    send(page, "Before it expires sim:tokens=8")
    expect(answer(page)).to_have_attribute("data-state", "done")
    gone = page.evaluate("() => window.__sluice.state().session")
    urllib.request.urlopen(
        urllib.request.Request(f"{sluice.base}/api/v1/sessions/{gone}", method="DELETE"), timeout=10
    ).close()

    send(page, "After it expired sim:tokens=8")
    expect(answer(page)).to_have_attribute("data-state", "error")
    expect(answer(page).get_by_test_id("message-status")).to_contain_text("no longer exists")
    expect(page.get_by_test_id("session")).to_have_count(0)
    expect(page.get_by_test_id("prompt")).to_have_value("After it expired sim:tokens=8")
    page.get_by_test_id("send").click()
    expect(answer(page)).to_have_attribute("data-state", "done")
    expect(page.get_by_test_id("session")).to_have_count(1)
    assert page.evaluate("() => window.__sluice.state().session") not in (None, gone)
    assert page.uncaught == []


# the sidebar's own logic, against a stand-in for the sessions API -----------------------------
class FakeSessions:
    """An in-memory POST/GET/DELETE /api/v1/sessions, behind page.route."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict] = {}

    def handle(self, route: Route) -> None:
        req = route.request
        path = req.url.split("/api/v1/sessions", 1)[1].split("?")[0].strip("/")
        if req.method == "POST" and not path:
            sid = f"se_fake{len(self.sessions)}"
            title = (req.post_data_json or {}).get("title", "")
            self.sessions[sid] = {"session_id": sid, "title": title, "created": 1_800_000_000}
            self.sessions[sid]["messages"] = []
            route.fulfill(
                status=201, json={k: v for k, v in self.sessions[sid].items() if k != "messages"}
            )
        elif req.method == "GET" and path in self.sessions:
            route.fulfill(status=200, json=self.sessions[path])
        elif req.method == "DELETE" and path in self.sessions:
            del self.sessions[path]
            route.fulfill(status=204, body="")
        else:
            route.fulfill(
                status=404, json={"error": {"code": "not_found", "message": "No such session."}}
            )

    def record(self, sid: str, prompt: str, reply: str) -> None:
        """What the server appends to a session when a stream with its session_id ends."""
        self.sessions[sid]["messages"] += [
            {"role": "user", "content": prompt, "created": 1_800_000_001},
            {"role": "assistant", "content": reply, "created": 1_800_000_002},
        ]


def without_session_id(route: Route) -> None:
    """Streams go to the real server, minus the fake session id it would not know."""
    body = route.request.post_data_json
    body.pop("session_id", None)
    route.continue_(post_data=json.dumps(body))


def test_sidebar_new_switch_delete(sluice, page):
    fake = FakeSessions()
    page.route("**/api/v1/sessions**", fake.handle)
    bodies = []
    page.on(
        "request",
        lambda r: bodies.append(r.post_data_json) if r.url.endswith(STREAM) else None,
    )
    page.route(f"**{STREAM}", without_session_id)
    open_chat(page, sluice.base)

    chats = []
    for prompt in ("First chat sim:tokens=12", "Second chat sim:tokens=15"):
        page.get_by_test_id("new-chat").click()
        send(page, prompt)
        expect(answer(page)).to_have_attribute("data-state", "done")
        sid = page.evaluate("() => window.__sluice.state().session")
        assert sid in fake.sessions and bodies[-1]["session_id"] == sid
        fake.record(sid, prompt, answer_text(page))
        chats.append((sid, prompt, answer_text(page)))
    sessions = page.get_by_test_id("session")
    expect(sessions).to_have_count(2)
    expect(sessions.first).to_have_attribute("data-session-id", chats[1][0])  # newest first
    expect(sessions.first).to_have_attribute("aria-current", "true")

    # reload: the ids come back from localStorage, the current chat's history from GET
    page.reload()
    expect(page.get_by_test_id("session")).to_have_count(2)
    expect(page.get_by_test_id("user-text")).to_have_text([chats[1][1]])
    expect(page.get_by_test_id("assistant-text")).to_have_text([chats[1][2]])

    # switch to the first chat
    page.locator(f'[data-session-id="{chats[0][0]}"] [data-testid="session-open"]').click()
    expect(page.get_by_test_id("user-text")).to_have_text([chats[0][1]])
    expect(page.get_by_test_id("assistant-text")).to_have_text([chats[0][2]])

    # delete the current one: gone from the server, the sidebar, localStorage; a new chat opens
    page.locator(f'[data-session-id="{chats[0][0]}"] [data-testid="session-delete"]').click()
    expect(page.get_by_test_id("session")).to_have_count(1)
    expect(page.get_by_test_id("user-message")).to_have_count(0)
    assert chats[0][0] not in fake.sessions
    stored = page.evaluate("() => JSON.parse(localStorage.getItem('sluice.sessions'))")
    assert [s["id"] for s in stored] == [chats[1][0]]

    # a session that expired on the server disappears from the sidebar when opened
    del fake.sessions[chats[1][0]]
    page.get_by_test_id("session-open").click()
    expect(page.get_by_test_id("notice")).to_contain_text("no longer exists")
    expect(page.get_by_test_id("session")).to_have_count(0)
    no_page_errors(page)


def test_chat_works_without_the_sessions_api(sluice, page):
    page.route(
        "**/api/v1/sessions**",
        lambda route: route.fulfill(
            status=404, json={"error": {"code": "not_found", "message": "Not found."}}
        ),
    )
    open_chat(page, sluice.base)
    prompt = "No history here sim:tokens=10"
    send(page, prompt)
    expect(answer(page)).to_have_attribute("data-state", "done")
    assert answer_text(page) == expected_text(prompt)
    expect(page.get_by_test_id("sidebar-note")).to_contain_text("not saved")
    expect(page.get_by_test_id("session")).to_have_count(0)
    send(page, "Still chatting sim:tokens=5")
    expect(page.get_by_test_id("assistant-message")).to_have_count(2)
    expect(answer(page)).to_have_attribute("data-state", "done")
    no_page_errors(page)


# errors ----------------------------------------------------------------------------------------
def fail_with(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    def handler(route: Route) -> None:
        body = {"error": {"code": code, "message": message}}
        route.fulfill(status=status, json=body, headers=headers or {})

    return handler


@pytest.mark.parametrize(
    ("status", "code", "headers", "shown"),
    [
        (429, "rate_limited", {"Retry-After": "7"}, "Too many requests — try again in 7 s."),
        (429, "too_many_streams", {}, "Too many answers are streaming at once"),
        (400, "invalid_request", {}, "Invalid field 'prompt': too long. (invalid_request)"),
        (503, "redis_unavailable", {}, "data store is unavailable"),
    ],
)
def test_http_errors_are_explained(sluice, page, status, code, headers, shown):
    message = "Invalid field 'prompt': too long." if code == "invalid_request" else "Nope."
    page.route(f"**{STREAM}", fail_with(status, code, message, headers))
    open_chat(page, sluice.base)
    send(page, "hello")
    expect(answer(page)).to_have_attribute("data-state", "error")
    expect(answer(page).get_by_test_id("message-status")).to_contain_text(shown)
    expect(page.get_by_test_id("prompt")).to_have_value("hello")  # given back to retry
    expect(page.get_by_test_id("send")).to_be_visible()
    assert page.uncaught == []


@pytest.mark.parametrize(
    ("directive", "code", "shown"),
    [
        ("sim:fail=500", "upstream_error", "The model provider failed"),
        ("sim:fail=429", "upstream_rate_limited", "rate limiting"),
        ("sim:tokens=50 sim:close_after=5", "upstream_error", "The model provider failed"),
    ],
)
def test_error_events_are_explained(sluice, page, directive, code, shown):
    open_chat(page, sluice.base)
    send(page, f"Will fail {directive}")
    expect(answer(page)).to_have_attribute("data-state", "error")
    status = answer(page).get_by_test_id("message-status")
    expect(status).to_contain_text(shown)
    expect(status).to_contain_text(f"({code})")
    expect(status).to_have_attribute("role", "alert")
    assert page.uncaught == []


# rendering and parsing -------------------------------------------------------------------------
def test_model_html_is_shown_as_text_never_markup(sluice, page):
    """Raw HTML in an answer is text (Markdown rendering escapes it; tests/test_web_signin.py
    has the Markdown itself and the attacks through the sanitizer)."""
    events = [
        ("start", {"type": "start", "stream_id": "st_" + "0" * 32, "session_id": None}),
        (
            "token",
            {"type": "token", "token": "<b>bold</b> <img src=x onerror=alert(1)>", "index": 0},
        ),
        ("token", {"type": "token", "token": "\nline two &amp;", "index": 1}),
        ("done", {"type": "done", "finished": True, "reason": "stop", "usage": {}, "metadata": {}}),
    ]
    body = "".join(
        f"id: {i}\r\nevent: {name}\r\ndata: {json.dumps(data)}\r\n\r\n: ping\r\n\r\n"
        for i, (name, data) in enumerate(events, 1)
    )
    page.route(
        f"**{STREAM}",
        lambda route: route.fulfill(
            status=200, body=body, headers={"Content-Type": "text/event-stream", "X-Stream-ID": "x"}
        ),
    )
    open_chat(page, sluice.base)
    send(page, "anything")
    expect(answer(page)).to_have_attribute("data-state", "done")
    text = "<b>bold</b> <img src=x onerror=alert(1)>\nline two &amp;"
    assert answer_text(page) == text
    shown = answer(page).get_by_test_id("assistant-text")
    expect(shown).to_contain_text("<b>bold</b> <img src=x onerror=alert(1)>")
    expect(page.locator('[data-testid="messages"] b, [data-testid="messages"] img')).to_have_count(
        0
    )
    no_page_errors(page)


SSE_SAMPLE = (
    ": ping\n\n"
    'id: 1\nevent: start\ndata: {"a": 1}\n\n'
    "id: 2\r\nevent: token\r\ndata: first\r\ndata: second\r\n\r\n"
    ": ping\r\n\r\n"
    "id: 3\revent: token\rdata:no space\r\r"
    "data: héllo wörld ✓\n\n"
    "event: done\nid: 5\ndata\ndata: x\n\n"
    "id: 6\ndata: unterminated"
)
SSE_EXPECTED = [
    {"id": "1", "event": "start", "data": '{"a": 1}'},
    {"id": "2", "event": "token", "data": "first\nsecond"},
    {"id": "3", "event": "token", "data": "no space"},
    {"id": "3", "event": "message", "data": "héllo wörld ✓"},
    {"id": "5", "event": "done", "data": "\nx"},
]


def test_sse_parser_survives_any_split(sluice, page):
    open_chat(page, sluice.base)
    results = page.evaluate(
        """sample => {
          const run = (chunks) => {
            const out = [];
            const p = new window.__sluice.SSEParser((e) => out.push(e));
            for (const c of chunks) p.feed(c);
            p.end();
            return JSON.stringify(out);
          };
          const results = { whole: run([sample]), chars: run([...sample]) };
          const splits = new Set();
          for (let i = 0; i <= sample.length; i++) {
            for (let j = i; j <= sample.length; j += 7) {
              splits.add(run([sample.slice(0, i), sample.slice(i, j), sample.slice(j)]));
            }
          }
          results.splits = [...splits];
          return results;
        }""",
        SSE_SAMPLE,
    )
    assert json.loads(results["whole"]) == SSE_EXPECTED
    assert json.loads(results["chars"]) == SSE_EXPECTED
    assert results["splits"] == [results["whole"]]


# phones ----------------------------------------------------------------------------------------
def test_phone_width_layout(sluice, browser, request):
    page = new_page(browser, request, viewport={"width": 375, "height": 740}, is_mobile=True)
    open_chat(page, sluice.base)
    send(page, "Short answer on a phone sim:tokens=60")
    expect(answer(page)).to_have_attribute("data-state", "done")
    overflow = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    assert page.evaluate(overflow) <= 0
    for testid in ("prompt", "send", "toggle-sidebar"):
        box = page.get_by_test_id(testid).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, (testid, box)
    expect(page.get_by_test_id("sidebar")).to_be_hidden()
    page.get_by_test_id("toggle-sidebar").click()
    expect(page.get_by_test_id("sidebar")).to_be_visible()
    expect(page.get_by_test_id("new-chat")).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-sidebar.png"))
    page.get_by_test_id("close-sidebar").click()
    expect(page.get_by_test_id("sidebar")).to_be_hidden()
    expect(page.get_by_test_id("assistant-message")).to_have_count(1)
    assert page.evaluate(overflow) <= 0
    no_page_errors(page)
