"""The status page at /admin/ in a real browser: auth, first paint, refresh, a pipe's move."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from urllib.parse import urlencode

import pytest

from conftest import ADMIN_TOKEN

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips these tests, or fails them in CI
    expect = None

REFRESH_WAIT_MS = 5_000     # the page refreshes every second
FAILOVER_WAIT_MS = 10_000


def page_url(proxy, token: str | None = ADMIN_TOKEN) -> str:
    return proxy.http_url + "/admin/" + ("?" + urlencode({"token": token}) if token is not None else "")


def backend_cell(page, url: str, field: str):
    return page.locator(f'#backends tr[data-url="{url}"] td[data-field="{field}"]')


def pipe_cell(page, client: str, field: str):
    return page.locator(f'#pipes tr[data-client="{client}"] td[data-field="{field}"]')


def http_status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.timeout(60)
def test_status_page_shows_backends_and_a_pipe_moving(processes, page, tmp_path):
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    proxy = processes.proxy("--backend", a.url, "--backend", b.url,
                            "--max-failures", "1", "--eject-base", "30", "--eject-max", "60")
    response = page.goto(page_url(proxy))
    assert response.status == 200
    assert response.headers["cache-control"] == "no-store"
    # the first paint, from the server
    expect(page.locator("#backends tbody tr")).to_have_count(2)
    for backend in (a, b):
        expect(backend_cell(page, backend.url, "state")).to_have_text("up")
        expect(backend_cell(page, backend.url, "failures")).to_have_text("0 / 0")
    expect(page.locator("#pipes tbody")).to_have_text("no live pipes")
    # the page refreshes by itself
    refreshed = page.locator("#refreshed")
    expect(refreshed).not_to_have_attribute("datetime", refreshed.get_attribute("datetime"),
                                            timeout=REFRESH_WAIT_MS)

    ws = proxy.connect()
    client = ws.client_id[:8]
    served = proxy.pipes()[0]["backend"]
    victim, survivor = (a, b) if served == a.url else (b, a)
    expect(pipe_cell(page, client, "backend")).to_have_text(victim.url, timeout=REFRESH_WAIT_MS)
    expect(pipe_cell(page, client, "state")).to_have_text("connected")
    expect(pipe_cell(page, client, "failovers")).to_have_text("0")
    expect(pipe_cell(page, client, "last_move_ms")).to_have_text("—")
    expect(backend_cell(page, victim.url, "clients")).to_have_text("1 / 1")

    victim.kill()
    expect(pipe_cell(page, client, "backend")).to_have_text(survivor.url, timeout=FAILOVER_WAIT_MS)
    expect(pipe_cell(page, client, "failovers")).to_have_text("1")
    expect(pipe_cell(page, client, "state")).to_have_text("connected")
    expect(pipe_cell(page, client, "buffered_bytes")).to_have_text("0")
    expect(pipe_cell(page, client, "last_move_ms")).to_have_text(re.compile(r"^\d+\.\d$"))
    expect(backend_cell(page, victim.url, "state")).to_contain_text("ejected")
    expect(backend_cell(page, victim.url, "failures")).to_have_text("1 / 1")
    expect(backend_cell(page, victim.url, "ejections")).to_have_text("1")
    expect(backend_cell(page, victim.url, "clients")).to_have_text("0 / 0")
    expect(backend_cell(page, survivor.url, "clients")).to_have_text("1 / 1")
    expect(page.locator("#pipe-count")).to_have_text("1")
    expect(page.locator("#error")).to_be_hidden()
    ws.send("still connected")
    assert ws.recv() == "still connected"
    page.screenshot(path=tmp_path / "status-page.png", full_page=True)
    ws.close()


@pytest.mark.timeout(60)
def test_status_page_needs_the_token(processes, page):
    proxy = processes.proxy()
    assert page.goto(page_url(proxy, token=None)).status == 401
    assert page.goto(page_url(proxy, token="wrong")).status == 401
    assert page.goto(page_url(proxy, token="")).status == 401
    assert "wrong bearer token" in page.content()
    assert page.goto(page_url(proxy)).status == 200
    # the header works too; a wrong header is not rescued by a right ?token=
    assert http_status(page_url(proxy, token=None), {"Authorization": f"Bearer {ADMIN_TOKEN}"}) == 200
    assert http_status(page_url(proxy), {"Authorization": "Bearer wrong"}) == 401
    # ?token= opens the page only: the API still wants the header
    assert http_status(proxy.http_url + "/admin/backends?" + urlencode({"token": ADMIN_TOKEN})) == 401
    # no admin token configured: no page either
    closed = processes.proxy(admin_token=None)
    assert page.goto(page_url(closed, token="anything")).status == 404


@pytest.mark.timeout(60)
def test_status_page_escapes_what_it_shows(processes, page):
    proxy = processes.proxy()
    hostile = 'ws://127.0.0.1:9/<img src=x id=injected onerror="document.title=1">'
    assert proxy.admin("POST", {"url": hostile})[0] == 201
    page.goto(page_url(proxy))
    cell = backend_cell(page, hostile.replace('"', '\\"'), "url")
    expect(cell).to_have_text(hostile)                       # the first paint, by the server
    refreshed = page.locator("#refreshed")
    expect(refreshed).not_to_have_attribute("datetime", refreshed.get_attribute("datetime"),
                                            timeout=REFRESH_WAIT_MS)
    expect(cell).to_have_text(hostile)                       # rebuilt by the script
    expect(page.locator("#injected")).to_have_count(0)
    assert page.title() == "iwsproxy status"


@pytest.mark.timeout(60)
def test_status_page_shows_a_failed_refresh(processes, page):
    a = processes.echo()
    proxy = processes.proxy("--backend", a.url)
    page.goto(page_url(proxy))
    error = page.locator("#error")
    expect(error).to_be_hidden()
    proxy.terminate()
    expect(error).to_be_visible(timeout=REFRESH_WAIT_MS)
    expect(error).to_contain_text("Refresh failed")
    expect(backend_cell(page, a.url, "state")).to_have_text("up")  # the last data stays
