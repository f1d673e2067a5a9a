"""The real ``vipd/status_page.html`` in headless Chromium, fed by a fixture ``api/status`` it polls live."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
from pathlib import Path

import pytest
from aiohttp import web

from chromium import Browser, chromium_path

PAGE = Path(__file__).resolve().parents[2] / "vipd" / "status_page.html"

# Each test gets a few seconds; the whole module, browser start included, stays well under 30 s.
pytestmark = pytest.mark.timeout(25)

STATUS = {
    "hostname": "mx1.example", "version": "0.1.0", "uptime_seconds": 3725.5, "workers": 2,
    "vips": [{"name": "mx", "listen": ["127.0.0.1:2525", "[::1]:2525"], "sessions": 3, "max_sessions": 200,
              "default_pool": "incoming"}],
    "pools": [
        {"name": "incoming", "balance": "roundrobin", "held": False, "usable": 2, "servers": [
            {"name": "s1", "address": "127.0.0.1:2526", "backup": False, "state": "up", "admin": "ready",
             "health": "up", "agent": "ready up 75%", "weight": 1, "effective_weight": 0.75,
             "active": 0, "selected": 42, "idle": 1,
             "check": {"ok": True, "detail": "EHLO 250", "duration_seconds": 0.0031, "age_seconds": 0.8},
             "changed_seconds": 31.2},
            {"name": "s2", "address": "127.0.0.1:2527", "backup": False, "state": "drain", "admin": "drain",
             "health": "up", "agent": None, "weight": 2, "effective_weight": 2.0,
             "active": 1, "selected": 7, "idle": 0,
             "check": {"ok": True, "detail": "EHLO 250", "duration_seconds": 0.002, "age_seconds": 1.5},
             "changed_seconds": 5.0},
            {"name": "s3", "address": "127.0.0.1:2528", "backup": True, "state": "down", "admin": "ready",
             "health": "down", "agent": None, "weight": 1, "effective_weight": 0.0,
             "active": 0, "selected": 0, "idle": 0,
             "check": {"ok": False, "detail": "connect: refused", "duration_seconds": 0.0004,
                       "age_seconds": 2.0},
             "changed_seconds": 900.0},
        ]},
        {"name": "outgoing", "balance": "leastconn", "held": False, "usable": 0, "servers": [
            {"name": "o1", "address": "127.0.0.1:2529", "backup": False, "state": "maint", "admin": "maint",
             "health": "unchecked", "agent": None, "weight": 1, "effective_weight": 0.0,
             "active": 0, "selected": 0, "idle": 0, "check": None, "changed_seconds": 86400.0},
        ]},
    ],
}

# Each row or section as its data-* attributes plus its visible text.
ROWS = "[...document.querySelectorAll('tr[data-server]')].map(e => Object.assign({text: e.innerText}, e.dataset))"
POOLS = "[...document.querySelectorAll('section[data-pool]')].map(e => Object.assign({text: e.innerText}, e.dataset))"


class StatusServer:
    """Serves the page at ``/`` and ``self.status`` at ``/api/status`` from a thread; records Authorization."""

    def __init__(self) -> None:
        self.status = copy.deepcopy(STATUS)
        self.fail = False
        self.lock = threading.Lock()
        self.authorization: list[str | None] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="status-server", daemon=True)

    def __enter__(self) -> StatusServer:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def url(self, query: str = "?refresh=300", fragment: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{query}{fragment}"

    def server(self, pool: str, name: str) -> dict:
        found = next(p for p in self.status["pools"] if p["name"] == pool)
        return next(s for s in found["servers"] if s["name"] == name)

    def edit(self, pool: str, name: str, **fields) -> None:
        with self.lock:
            self.server(pool, name).update(fields)

    async def _start(self) -> int:
        async def page(_: web.Request) -> web.Response:
            return web.Response(body=PAGE.read_bytes(), content_type="text/html", charset="utf-8")

        async def status(request: web.Request) -> web.Response:
            self.authorization.append(request.headers.get("Authorization"))
            if self.fail:
                return web.Response(status=500, text="boom")
            # Under the lock: a test edits the dict from its own thread while the page polls.
            with self.lock:
                body = json.dumps(self.status)
            return web.Response(text=body, content_type="application/json",
                                headers={"Cache-Control": "no-store"})

        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_get("/api/status", status)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One Chromium for the module (starting one costs about a second); each test navigates afresh."""
    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing at /usr/bin/chromium, and CI must run the status page tests")
        pytest.skip("chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    with Browser(tmp_path_factory.mktemp("chromium")) as b:
        yield b


@pytest.fixture
def server():
    with StatusServer() as s:
        yield s


def rendered(browser: Browser, server: StatusServer, query: str = "?refresh=300", fragment: str = "") -> None:
    browser.open(server.url(query, fragment))
    browser.wait_for("document.body.dataset.status === 'ok' && !!document.querySelector('tr[data-server]')",
                     timeout=10)


def test_renders_vips_pools_and_servers(browser, server, tmp_path):
    rendered(browser, server, query="")
    header = browser.evaluate("document.querySelector('header').innerText")
    assert "mx1.example" in header and "0.1.0" in header and "1h2m" in header
    assert browser.evaluate("document.getElementById('stale').hidden") is True

    vip = browser.evaluate("document.querySelector('#vips tr[data-vip=\"mx\"]').innerText")
    for text in ("mx", "127.0.0.1:2525 [::1]:2525", "3 / 200", "incoming"):
        assert text in vip

    pools = browser.evaluate(POOLS)
    assert [(p["pool"], p["held"]) for p in pools] == [("incoming", "false"), ("outgoing", "false")]
    assert "roundrobin" in pools[0]["text"] and "usable 2 / 3" in pools[0]["text"]
    assert "HELD" not in pools[0]["text"]

    rows = {(r["pool"], r["server"]): r for r in browser.evaluate(ROWS)}
    assert {k: r["state"] for k, r in rows.items()} == {
        ("incoming", "s1"): "up", ("incoming", "s2"): "drain", ("incoming", "s3"): "down",
        ("outgoing", "o1"): "maint"}
    s1 = rows["incoming", "s1"]["text"]
    for text in ("127.0.0.1:2526", "ready up 75%", "0.75", "42", "EHLO 250", "3.1 ms"):
        assert text in s1
    assert "backup" in rows["incoming", "s3"]["text"] and "failed" in rows["incoming", "s3"]["text"]
    assert "backup" not in rows["incoming", "s1"]["text"]

    # The state colours are distinct, so an operator can tell them apart at a glance.
    colours = browser.evaluate("[...document.querySelectorAll('tr[data-server] td.state')]"
                               ".map(td => getComputedStyle(td).backgroundColor)")
    assert len(set(colours)) == 4

    shot = tmp_path / "status.png"
    browser.screenshot(shot)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_live_refresh_follows_state_changes(browser, server):
    rendered(browser, server)
    s1 = "document.querySelector('tr[data-pool=\"incoming\"][data-server=\"s1\"]').dataset.state"
    assert browser.evaluate(s1) == "up"

    server.edit("incoming", "s1", state="down", health="down")
    assert browser.wait_for(f"{s1} === 'down'", timeout=5)
    server.edit("incoming", "s1", state="up", health="up")
    assert browser.wait_for(f"{s1} === 'up'", timeout=5)


def test_held_pool_is_marked(browser, server):
    server.status["pools"][0]["held"] = True
    rendered(browser, server)
    held = browser.evaluate("document.querySelector('section[data-pool=\"incoming\"]').dataset.held")
    assert held == "true"
    assert "HELD" in browser.evaluate("document.querySelector('section[data-pool=\"incoming\"] h2').innerText")
    assert browser.evaluate("document.querySelector('section[data-pool=\"outgoing\"]').dataset.held") == "false"


def test_markup_in_names_is_shown_as_text(browser, server):
    hostile = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
    server.server("incoming", "s1")["name"] = hostile
    server.server("incoming", "s2")["agent"] = "<u>underlined</u>"
    server.status["hostname"] = "<i>mx</i>"
    rendered(browser, server)

    names = [r["server"] for r in browser.evaluate(ROWS)]
    assert hostile in names
    assert hostile in browser.evaluate("document.getElementById('content').innerText")
    assert "<u>underlined</u>" in browser.evaluate("document.getElementById('content').innerText")
    assert browser.evaluate("document.getElementById('title').textContent") == "vipd <i>mx</i>"
    # Give an injected onerror time to fire before asserting it did not.
    browser.wait_for("new Promise(r => setTimeout(() => r(true), 300))")
    assert browser.evaluate("typeof window.__pwned") == "undefined"
    injected = "document.querySelectorAll('#content script, #content img, #content u, header i').length"
    assert browser.evaluate(injected) == 0


def test_fragment_token_is_sent_as_bearer(browser, server):
    rendered(browser, server, fragment="#token=s3cr%2Bt")
    assert server.authorization and set(server.authorization) == {"Bearer s3cr+t"}


def test_without_token_no_authorization_is_sent(browser, server):
    rendered(browser, server)
    assert server.authorization and set(server.authorization) == {None}


def test_stale_banner_when_the_daemon_fails(browser, server):
    rendered(browser, server)
    server.fail = True
    stale = "document.getElementById('stale')"
    banner = browser.wait_for(f"!{stale}.hidden && {stale}.innerText", timeout=5)
    assert "stale: cannot reach the daemon" in banner and "500" in banner
    assert browser.evaluate(f"{stale}.offsetHeight") > 0   # laid out, not just unhidden
    # The last good picture stays on screen under the banner.
    assert browser.evaluate("document.querySelectorAll('tr[data-server]').length") == 4

    server.fail = False
    assert browser.wait_for(f"{stale}.hidden", timeout=5)
