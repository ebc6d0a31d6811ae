"""The chat page's budget line, in a real browser against real gunicorn, Redis and the simulator.

The server trusts one proxy hop, and the browser context sends its own
``X-Forwarded-For``: the page is a client of its own (open mode counts per
IP), whatever else the suite sent from 127.0.0.1. Nothing sleeps: every wait
is a Playwright expectation with a deadline.
"""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import Page, expect

from streaming.core import keys
from streaming.core.usage import day_of
from tests.browser import ARTIFACTS, chromium

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(120)]

WAIT_MS = 30_000
BUDGET = 1000


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def budgeted(make_sluice):
    return make_sluice(TRUSTED_PROXIES="1", TOKEN_BUDGET_DAILY=str(BUDGET))


def new_page(browser, request, ip: str | None = None) -> Page:
    headers = {"X-Forwarded-For": ip} if ip else {}
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, locale="en-US", extra_http_headers=headers
    )
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.uncaught = []
    page.on("pageerror", lambda exc: page.uncaught.append(exc))

    def finish() -> None:
        try:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"))
        finally:
            context.close()

    request.addfinalizer(finish)
    return page


def send(page: Page, text: str) -> None:
    page.get_by_test_id("prompt").fill(text)
    page.get_by_test_id("send").click()


def test_no_budget_no_budget_line(sluice, browser, request):
    page = new_page(browser, request)
    with page.expect_response("**/api/v1/usage") as usage:
        page.goto(sluice.base + "/")
    assert usage.value.status == 200
    expect(page.get_by_test_id("prompt")).to_be_visible()
    expect(page.get_by_test_id("budget")).to_be_hidden()
    assert page.uncaught == []


def test_the_page_shows_what_is_left_and_when_it_is_spent(budgeted, browser, request, redis_client):
    ip = "10.29.0.1"
    page = new_page(browser, request, ip)
    page.goto(budgeted.base + "/")
    line = page.get_by_test_id("budget")
    expect(line).to_contain_text("1,000 of 1,000 tokens left today")

    send(page, "hello sim:tokens=5")
    answer = page.get_by_test_id("assistant-message").last
    expect(answer).to_have_attribute("data-state", "done")
    # refreshed after the answer: prompt + completion tokens are gone from the budget
    expect(line).not_to_contain_text("1,000 of 1,000")
    expect(line).to_contain_text("of 1,000 tokens left today")

    redis_client.hset(keys.usage(ip, day_of(time.time())), mapping={"prompt_tokens": BUDGET})
    send(page, "one more")
    answer = page.get_by_test_id("assistant-message").last
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.get_by_test_id("message-status")).to_contain_text(
        "Your daily token budget is used up. It resets at"
    )
    expect(line).to_have_attribute("data-state", "spent")
    expect(line).to_contain_text("Today's token budget (1,000 tokens) is used up.")
    expect(line).to_contain_text("New answers can start again at")
    assert page.uncaught == []
