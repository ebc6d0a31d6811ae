"""The chat page signed in (API_KEYS / JWT), Markdown answers, their sanitizing, and a front
end on another origin calling Sluice through CORS, in Chromium against real gunicorn.

Each test leaves a screenshot in tests/artifacts/<test name>.png. Nothing sleeps.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import Page, expect

from tests.browser import chromium
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, Signer
from tests.sse_client import request
from tests.test_web import (
    STREAM,
    answer,
    answer_text,
    expected_text,
    log_requests,
    new_page,
    no_page_errors,
    send,
    wait_longer_than,
)

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(120)]

KEY = "key-one"


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("RS256", "idp-1")


@pytest.fixture(scope="module")
def authed(make_sluice, signer):
    """Keys and an identity provider's JWTs (RS256, from its JWKS) at once; a generation
    outlives its client by 10 s (for the resume)."""
    with JwksServer(signer) as idp:
        yield make_sluice(
            workers=2,
            API_KEYS=KEY,
            JWT_JWKS_URL=idp.url,
            JWT_ISSUER=ISSUER,
            JWT_AUDIENCE=AUDIENCE,
            DISCONNECT_GRACE_SECONDS="10",
        )


@pytest.fixture()
def page(browser, request) -> Page:
    return new_page(browser, request)


def sign_in(page: Page, base: str, credential: str) -> None:
    page.goto(base + "/")
    expect(page.get_by_test_id("signin")).to_be_visible()
    page.get_by_test_id("signin-token").fill(credential)
    page.get_by_test_id("signin-submit").click()
    expect(page.get_by_test_id("signin")).to_be_hidden()
    expect(page.get_by_test_id("account")).to_be_visible()


def signed_in_status(page: Page) -> int:
    return page.evaluate("() => fetch('/api/v1/auth/session').then((r) => r.status)")


def test_sign_in_with_a_key_chat_stop_reload_sign_out(authed, simulator, page, tag):
    page.goto(authed.base + "/")
    expect(page.get_by_test_id("signin")).to_be_visible()
    expect(page.get_by_test_id("account")).to_be_hidden()
    # a wrong key is explained, and nothing else happens
    page.get_by_test_id("signin-token").fill("not-the-key")
    page.get_by_test_id("signin-submit").click()
    expect(page.get_by_test_id("signin-error")).to_contain_text("not accepted")
    sign_in(page, authed.base, KEY)
    expect(page.get_by_test_id("account-label")).to_contain_text("API key")
    cookies = page.context.cookies()
    (cookie,) = [c for c in cookies if c["name"] == "sluice_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and KEY not in cookie["value"]
    assert page.evaluate("() => document.cookie") == ""  # scripts cannot read it

    # chat
    prompt = "Tell me about lakes sim:tokens=40"
    send(page, prompt)
    expect(answer(page)).to_have_attribute("data-state", "done")
    assert answer_text(page) == expected_text(prompt)
    expect(page.get_by_test_id("session")).to_have_count(1)

    # stop (a cookie-authenticated DELETE: the browser sends its own Origin)
    requests = log_requests(page)
    send(page, f"A long story sim:tokens=3000 sim:rate=30 sim:tag={tag}")
    wait_longer_than(page, 20)
    page.get_by_test_id("stop").click()
    expect(answer(page)).to_have_attribute("data-state", "stopped")
    expect(answer(page)).to_have_attribute("data-reason", "cancelled")
    stream_id = page.evaluate("() => window.__sluice.state().streamId")
    assert ("DELETE", f"{authed.base}{STREAM}/{stream_id}") in requests
    assert simulator.record(tag)["state"] == "client_closed"

    # reload: still signed in, the chat list comes from the server, the history loads
    page.reload()
    expect(page.get_by_test_id("account")).to_be_visible()
    expect(page.get_by_test_id("signin")).to_be_hidden()
    expect(page.get_by_test_id("session")).to_have_count(1)
    expect(page.get_by_test_id("user-message")).to_have_count(2)
    expect(page.get_by_test_id("assistant-text").first).to_have_text(expected_text(prompt))

    # sign out: the server session is gone, the page asks again and shows nothing of before
    page.get_by_test_id("sign-out").click()
    expect(page.get_by_test_id("signin")).to_be_visible()
    expect(page.get_by_test_id("session")).to_have_count(0)
    expect(page.get_by_test_id("user-message")).to_have_count(0)
    assert signed_in_status(page) == 401
    page.reload()
    expect(page.get_by_test_id("signin")).to_be_visible()
    assert page.uncaught == []


def test_sign_in_with_a_jwt_and_resume_after_a_dropped_connection(authed, signer, page):
    sign_in(page, authed.base, signer.token(sub="dana"))
    expect(page.get_by_test_id("account-label")).to_contain_text("token")
    prompt = "Explain the tides to me sim:tokens=150 sim:rate=40"
    requests = log_requests(page)
    send(page, prompt)
    wait_longer_than(page, 30)
    assert page.evaluate("() => window.__sluiceDropConnection()") is True
    expect(answer(page)).to_have_attribute("data-state", "done")
    assert answer_text(page) == expected_text(prompt)  # nothing lost, nothing duplicated
    state = page.evaluate("() => window.__sluice.state()")
    assert state["resumes"] >= 1 and state["auth"] == "signed-in"
    assert any(
        m == "GET" and f"{STREAM}/{state['streamId']}?last_event_id=" in u for m, u in requests
    )
    # the JWT's owner is not the key's: the key sees none of these chats
    status, _, body = request(
        authed.base, "GET", "/api/v1/sessions", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert status == 200
    assert state["session"] not in [s["session_id"] for s in body["sessions"]]
    no_page_errors(page)


def test_an_expired_sign_in_asks_again(authed, page):
    sign_in(page, authed.base, KEY)
    # revoked elsewhere (another tab signed out): the next request finds out
    page.evaluate("() => fetch('/api/v1/auth/session', {method: 'DELETE'}).then((r) => r.status)")
    page.context.add_cookies(
        [{"name": "sluice_session", "value": "revoked", "url": authed.base, "httpOnly": True}]
    )
    send(page, "hello")
    expect(page.get_by_test_id("signin")).to_be_visible()
    expect(page.get_by_test_id("signin-error")).to_contain_text("sign in again")
    expect(page.get_by_test_id("sidebar-note")).to_be_empty()
    expect(page.get_by_test_id("signin-token")).to_be_focused()
    expect(page.get_by_test_id("prompt")).to_have_value("hello")  # given back for later
    # signing in again goes on where it was
    page.get_by_test_id("signin-token").fill(KEY)
    page.get_by_test_id("signin-submit").click()
    expect(page.get_by_test_id("signin")).to_be_hidden()
    page.get_by_test_id("send").click()
    expect(answer(page)).to_have_attribute("data-state", "done")
    assert page.uncaught == []


# -- Markdown ----------------------------------------------------------------------------


def sse_body(tokens: list[str]) -> str:
    events = [("start", {"type": "start", "stream_id": "st_" + "0" * 32, "session_id": None})]
    events += [("token", {"type": "token", "token": t, "index": i}) for i, t in enumerate(tokens)]
    events.append(
        ("done", {"type": "done", "finished": True, "reason": "stop", "usage": {}, "metadata": {}})
    )
    frames = [
        f"id: {i}\nevent: {n}\ndata: {json.dumps(d)}\n\n" for i, (n, d) in enumerate(events, 1)
    ]
    return "retry: 1000\n\n" + "".join(frames)


def answer_with(page: Page, base: str, tokens: list[str]) -> None:
    page.route(
        f"**{STREAM}",
        lambda route: route.fulfill(
            status=200,
            body=sse_body(tokens),
            headers={"Content-Type": "text/event-stream", "X-Stream-ID": "st_" + "0" * 32},
        ),
    )
    page.goto(base + "/")
    expect(page.get_by_test_id("prompt")).to_be_visible()
    send(page, "anything")
    expect(answer(page)).to_have_attribute("data-state", "done")


MARKDOWN = [
    "## Rivers\n\nSome *emphasis*, some **strong** text and a [link](https://example.com/x).\n\n",
    "- one\n- two\n- three\n\n1. first\n2. second\n\n",
    "| name | length |\n| --- | --- |\n| Nile | 6650 |\n| Amazon | 6400 |\n\n",
    "```python\nprint('hi')\nx = 1 < 2\n```\n\nInline `code` too.",
]


def test_answers_render_as_markdown_with_a_copy_button(sluice, page):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=sluice.base)
    answer_with(page, sluice.base, MARKDOWN)
    shown = answer(page).get_by_test_id("assistant-text")
    expect(shown.locator("h2")).to_have_text("Rivers")
    expect(shown.locator("em")).to_have_text("emphasis")
    expect(shown.locator("strong")).to_have_text("strong")
    link = shown.locator("a")
    expect(link).to_have_attribute("href", "https://example.com/x")
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(shown.locator("ul > li")).to_have_count(3)
    expect(shown.locator("ol > li")).to_have_count(2)
    expect(shown.locator("table th")).to_have_text(["name", "length"])
    expect(shown.locator("table td")).to_have_text(["Nile", "6650", "Amazon", "6400"])
    expect(shown.locator("pre code")).to_have_text("print('hi')\nx = 1 < 2\n")
    expect(shown.locator("p code")).to_have_text("code")
    copy = shown.get_by_test_id("copy-code")
    expect(copy).to_have_count(1)
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == "print('hi')\nx = 1 < 2\n"
    no_page_errors(page)


def test_markdown_renders_while_it_streams(sluice, page):
    page.goto(sluice.base + "/")
    send(page, "Slow words sim:tokens=80 sim:rate=40")
    wait_longer_than(page, 20)
    expect(answer(page)).to_have_attribute("data-state", "streaming")
    # rendered already: paragraphs, not raw text
    expect(answer(page).get_by_test_id("assistant-text").locator("p").first).to_be_visible()
    assert answer(page).get_attribute("data-state") == "streaming"
    expect(answer(page)).to_have_attribute("data-state", "done")


ATTACKS = [
    "Look: <img src=x onerror=\"window.__pwned = 'img'\">\n\n",
    "<script>window.__pwned = 'script'</script>\n\n",
    "<scr",
    "ipt>window.__pwned = 'split'</script>\n\n",  # a tag split across two tokens
    '<svg onload="window.__pwned = \'svg\'"></svg> <iframe src="javascript:window.__pwned=1">\n\n',
    "[click me](javascript:window.__pwned='link') and "
    "[data](data:text/html,<script>x</script>)\n\n",
    '![pixel](https://tracker.example/p.gif "t") ![x](x" onerror="window.__pwned=2)\n\n',
    '<a href="https://ok.example" onclick="window.__pwned=3">raw link</a> '
    '<div style="position:fixed;inset:0">cover</div> <form action="/x"><input></form>\n\n',
    "```html\n<img src=x onerror=\"window.__pwned = 'code'\">\n```\n",
]


def test_an_answer_cannot_run_script_or_inject_elements(sluice, page):
    page.goto(sluice.base + "/")
    before = page.evaluate(
        "() => ({scripts: document.scripts.length, imgs: document.images.length,"
        " frames: window.frames.length})"
    )
    page.evaluate(
        """() => {
          window.__added = [];
          new MutationObserver((records) => {
            for (const r of records) for (const n of r.addedNodes) {
              if (n.nodeType === 1) window.__added.push(n.tagName);
            }
          }).observe(document, { childList: true, subtree: true });
        }"""
    )
    page.route(
        f"**{STREAM}",
        lambda route: route.fulfill(
            status=200,
            body=sse_body(ATTACKS),
            headers={"Content-Type": "text/event-stream", "X-Stream-ID": "st_" + "0" * 32},
        ),
    )
    send(page, "attack me")
    expect(answer(page)).to_have_attribute("data-state", "done")
    shown = answer(page).get_by_test_id("assistant-text")
    # every link left: http(s) or none at all; clicking the ones whose javascript: or data:
    # URL was removed does nothing
    for link in shown.locator("a").all():
        href = link.get_attribute("href")
        assert href is None or href.startswith("https://"), href
        if href is None:
            link.click()
    assert page.evaluate("() => window.__pwned") is None
    after = page.evaluate(
        "() => ({scripts: document.scripts.length, imgs: document.images.length,"
        " frames: window.frames.length})"
    )
    assert after == before
    inside = page.evaluate(
        """() => [...document.querySelector('[data-testid="messages"]').querySelectorAll('*')]
             .map((e) => [e.tagName, [...e.attributes].map((a) => a.name)])"""
    )
    tags = {tag for tag, _ in inside}
    assert not tags & {"IMG", "SCRIPT", "svg", "IFRAME", "FORM", "INPUT", "STYLE"}, tags
    assert all(
        not name.startswith("on") and name != "style" for _, names in inside for name in names
    )
    added = set(page.evaluate("() => window.__added"))
    assert not added & {"IMG", "SCRIPT", "svg", "IFRAME", "FORM", "INPUT", "STYLE"}
    # what they tried is shown, as text
    expect(shown).to_contain_text("<script>window.__pwned = 'script'</script>")
    expect(shown.locator("pre code")).to_contain_text("<img src=x onerror=")
    no_page_errors(page)


# -- a front end on another origin -------------------------------------------------------

FRONT_PAGE = """<!doctype html><meta charset="utf-8"><title>front</title>
<script>
window.run = async (api, token) => {
  const auth = { Authorization: `Bearer ${token}` };
  const out = {};
  const resp = await fetch(`${api}/api/v1/completions/stream`, {
    method: "POST", headers: { ...auth, "Content-Type": "application/json" },
    body: JSON.stringify({ prompt: "From another origin sim:tokens=12" }),
  });
  out.status = resp.status;
  out.streamId = resp.headers.get("X-Stream-ID");
  out.body = await resp.text();
  const models = await fetch(`${api}/v1/models`, { headers: auth });
  out.models = (await models.json()).data.map((m) => m.id);
  const attach = await fetch(`${api}/api/v1/completions/stream/${out.streamId}`, {
    headers: { ...auth, "Last-Event-ID": "1" },
  });
  out.attach = await attach.text();
  const cancel = await fetch(`${api}/api/v1/completions/stream/${out.streamId}`, {
    method: "DELETE", headers: auth,
  });
  out.cancel = await cancel.json();
  const denied = await fetch(`${api}/api/v1/sessions`,
                             { headers: { Authorization: "Bearer wrong" } });
  out.denied = denied.status;
  return out;
};
window.tryIt = async (api, token) => {
  try {
    const r = await fetch(`${api}/v1/models`, { headers: { Authorization: `Bearer ${token}` } });
    return r.status;
  } catch (e) { return String(e); }
};
</script>"""


@pytest.fixture(scope="module")
def front_end():
    """A tiny static server on its own port: the front end's origin."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = FRONT_PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_front_end_on_another_origin_uses_its_own_token(make_sluice, front_end, page):
    server = make_sluice(workers=2, API_KEYS="front-key", CORS_ORIGINS=front_end)
    page.goto(front_end + "/")
    out = page.evaluate("([api, token]) => window.run(api, token)", [server.base, "front-key"])
    assert out["status"] == 200 and out["streamId"].startswith("st_")
    assert out["body"].startswith("retry: 1000\n\n") and "event: done" in out["body"]
    assert "gpt-4o-mini" in out["models"]
    assert out["attach"].startswith("retry: 1000\n\nid: 2\n")  # resumed after event 1
    assert out["cancel"] == {"stream_id": out["streamId"], "status": "finished"}
    assert out["denied"] == 401
    # the same page served from an origin that is not listed: the browser refuses to read
    other = front_end.replace("localhost", "127.0.0.1")
    page.goto(other + "/")
    result = page.evaluate("([api, token]) => window.tryIt(api, token)", [server.base, "front-key"])
    assert "TypeError" in str(result), result
    assert page.uncaught == []
