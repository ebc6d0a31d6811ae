"""Debian's Chromium driven by Playwright, for the tests of the web chat page.

Playwright's Python package ships its own driver; no Playwright browser is downloaded
(`playwright install` is never run): the tests drive the distribution's Chromium
(`apt-get install -y chromium`). A missing browser fails the tests; they never skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium; fails (never skips) when the browser is not installed."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: the web page tests need Debian's chromium "
            "package (apt-get install -y chromium); they do not skip without it.",
            pytrace=False,
        )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
