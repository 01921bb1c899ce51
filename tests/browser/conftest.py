"""Browser fixtures: Debian's chromium, headless, driven by Playwright's sync API.

Playwright's own browser downloads are not used: ``executable_path`` points at the
system's chromium (``apt-get install chromium``). When chromium or playwright is
missing the tests are skipped with the reason, except in CI (``CI`` set), where
they fail instead.
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading

import pytest

from conftest import needs

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the `browser` fixture skips, or fails in CI
    sync_playwright = None

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DEFAULT_TIMEOUT_MS = 10_000


def _missing() -> str | None:
    if sync_playwright is None:
        return "playwright is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="session")
def browser():
    needs(_missing(), "the browser tests")
    with sync_playwright() as playwright:
        # --no-sandbox: the tests run as root, where chromium's sandbox refuses to start
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page in its own context; fails the test if the page threw an uncaught error."""
    context = browser.new_context()
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    page = context.new_page()
    uncaught: list[str] = []
    page.on("pageerror", lambda error: uncaught.append(str(error)))
    yield page
    context.close()
    assert not uncaught, f"uncaught errors in the page: {uncaught}"


@pytest.fixture
def serve_html():
    """``serve_html(html) -> url``: a page served over HTTP from 127.0.0.1, for a real Origin."""
    servers: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []

    def serve(html: str) -> str:
        body = html.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # noqa: A002 - the base class's name
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, name="serve_html", daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield serve
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()
