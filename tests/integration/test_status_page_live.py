"""The status page of a running vipd in headless Chromium: it follows servers going down and back,
an operator's drain and a held pool, live, without reloading."""

from __future__ import annotations

import os

import pytest

from chromium import Browser, chromium_path
from support import Admin, Lab, health_config as config, wait_for

STATE = "document.querySelector('tr[data-pool=\"incoming\"][data-server=\"{name}\"]')?.dataset.state"
HELD = "document.querySelector('section[data-pool=\"incoming\"]')?.dataset.held"


@pytest.fixture
def browser(tmp_path):
    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing at /usr/bin/chromium, and CI must run the status page tests")
        pytest.skip("chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    with Browser(tmp_path / "chromium") as b:
        yield b


def test_the_page_shows_a_server_going_down_and_coming_back(lab: Lab, browser: Browser, tmp_path) -> None:
    a, b = lab.sink("a"), lab.sink("b")
    vipd = lab.vipd(config([a, b], "interval_seconds = 0.3, rise = 2, fall = 2"))
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    browser.open(f"{admin.url}/?refresh=300")
    assert browser.wait_for(STATE.format(name="b") + " === 'up'")
    assert "mx.vipd.test" in browser.evaluate("document.body.innerText")

    b.proc.stop()
    browser.wait_for(STATE.format(name="b") + " === 'down'")
    assert browser.evaluate(STATE.format(name="a")) == "up"
    b = lab.restart_sink(b)
    browser.wait_for(STATE.format(name="b") + " === 'up'")
    browser.screenshot(tmp_path / "status.png")
    assert (tmp_path / "status.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # An operator's changes show up too.
    admin.vipctl("server", "drain", "incoming/a")
    browser.wait_for(STATE.format(name="a") + " === 'drain'")
    admin.vipctl("pool", "hold", "incoming")
    browser.wait_for(HELD + " === 'true'")
    admin.vipctl("pool", "release", "incoming")
    admin.vipctl("server", "ready", "incoming/a")
    browser.wait_for(HELD + " === 'false' && " + STATE.format(name="a") + " === 'up'")
    wait_for(lambda: "server up pool=incoming server=b was=down" in vipd.log(), what="the log line")
