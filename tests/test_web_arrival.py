"""The page warns when its own answer arrives all at once (static/arrival.js), in Chromium.

Directly from gunicorn the answer streams over ~2 s and no warning shows; behind
nginx with buffering forced on (tests/nginx_variants.py `buffering`) the same
answer arrives in one burst at the end and the warning shows, pointing at the
doctor. Nothing sleeps: every wait is a Playwright expectation.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests import nginx_variants
from tests.browser import ARTIFACTS, chromium
from tests.test_nginx import Nginx, nginx_binary
from tests.test_web import answer, new_page, no_page_errors, open_chat, send

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(90)]

PROMPT = "Tell me about rivers sim:tokens=40 sim:rate=20"  # ~2 s of tokens
WARNING = '[data-testid="buffering-warning"]'
RESULTS = "() => window.sluiceArrival.results"


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture()
def page(browser, request):
    return new_page(browser, request)


@pytest.fixture(scope="module")
def server(make_sluice):
    # UPSTREAM_HEAD_TIMEOUT_SECONDS: the settings refuse one above the suite's 3 s upstream timeout
    return make_sluice(workers=2, TRUSTED_PROXIES="1", UPSTREAM_HEAD_TIMEOUT_SECONDS="3")


@pytest.fixture(scope="module")
def buffering_nginx(server):
    nginx_binary()
    proxy = Nginx(server.port, nginx_variants.buffering)
    try:
        yield proxy.start()
    finally:
        proxy.stop()


def ask(page, base: str) -> dict:
    open_chat(page, base)
    send(page, PROMPT)
    expect(answer(page)).to_have_attribute("data-state", "done")
    results = page.evaluate(RESULTS)
    assert len(results) == 1, results
    return results[0]


def test_no_warning_when_the_answer_streams(server, page):
    result = ask(page, server.base)
    assert result["serverMs"] >= 1000 and result["tokens"] >= 5, result  # the rule applied
    assert not result["burst"] and result["clientMs"] > result["serverMs"] * 0.5, result
    expect(page.locator(WARNING)).to_have_count(0)
    no_page_errors(page)


@pytest.mark.nginx
def test_a_warning_when_a_proxy_delivers_it_all_at_once(buffering_nginx, page):
    result = ask(page, buffering_nginx.base)
    assert result["burst"] and result["serverMs"] >= 1000, result
    warning = page.locator(WARNING)
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("reached this page all at once")
    expect(warning).to_contain_text(f"python -m streaming.doctor {buffering_nginx.base}")
    expect(warning).to_contain_text("docs/DEPLOY.md")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "buffering-warning-shown.png"))
    warning.get_by_role("button", name="Dismiss this warning").click()
    expect(page.locator(WARNING)).to_have_count(0)
    no_page_errors(page)
