"""Drive Debian's headless Chromium over the DevTools protocol, synchronously, for pytest.

One browser process, one page. The protocol runs on a private event loop in a daemon thread (aiohttp's
websocket client); the sync methods hand it coroutines and wait. Chromium's stderr goes to a file that is
polled for the DevTools address, and the process is stopped by PID on close, also after a failure.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

__all__ = ["Browser", "BrowserError", "chromium_path"]

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Containers often have a tiny /dev/shm, where Chromium's renderers crash; loopback needs no proxy.
    "--disable-dev-shm-usage", "--no-proxy-server", "--window-size=1400,900",
    "--remote-debugging-port=0",
]
DEVTOOLS_LINE = re.compile(rb"DevTools listening on (ws://[^\s]+)")


def chromium_path() -> str | None:
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else None


class BrowserError(RuntimeError):
    """A DevTools error reply, a JavaScript exception, or a failed navigation."""


class Browser:
    def __init__(self, tmp_path: Path, chromium: str = CHROMIUM) -> None:
        self.dir = Path(tmp_path) / f"chromium-{os.getpid()}-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        self.log = self.dir / "stderr.log"
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._events: list[dict] = []
        self._event_added: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chromium-cdp", daemon=True)
        self._thread.start()
        self._popen: subprocess.Popen | None = None
        try:
            self._launch(chromium)
            self._run(self._connect(), timeout=30)
        except BaseException:
            self.close()
            raise

    # -- sync API ---------------------------------------------------------------------------------

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, url: str, timeout: float = 20.0) -> None:
        self._run(self._open(url, timeout), timeout=timeout + 5)

    def evaluate(self, expression: str):
        reply = self._run(self._send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True}), timeout=20)
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} threw: {text}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, interval: float = 0.05):
        # Truthy as Python sees the returned value: a DOM node or an empty array comes back falsy,
        # so expressions should end in a boolean, a count or a string.
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = self.evaluate(expression)
            except BrowserError as error:
                # During a navigation the old context is destroyed under the expression: retry, unless
                # the browser itself is gone.
                if self._popen.poll() is not None:
                    raise
                last = error
            if last and not isinstance(last, BrowserError):
                return last
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} not truthy after {timeout}s; last value: {last!r}")
            time.sleep(interval)

    def screenshot(self, path: Path) -> None:
        reply = self._run(self._send("Page.captureScreenshot", {"format": "png"}), timeout=30)
        Path(path).write_bytes(base64.b64decode(reply["data"]))

    def close(self) -> None:
        if self._loop.is_running():
            try:
                self._run(self._disconnect(), timeout=5)
            except Exception:
                pass  # the browser is killed below whatever state the socket is in
        self._stop_process()
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    # -- process ----------------------------------------------------------------------------------

    def _launch(self, chromium: str) -> None:
        home = self.dir / "home"
        home.mkdir()
        # HOME and XDG point inside tmp_path so Chromium's NSS db, caches and crash dumps stay there.
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_CACHE_HOME": str(home / ".cache")}
        args = [chromium, *FLAGS, f"--user-data-dir={self.dir / 'profile'}", "about:blank"]
        with open(self.log, "wb") as err:
            # Its own session, so that helpers orphaned by a killed browser can be reaped by group id.
            self._popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                           env=env, start_new_session=True)

    def _devtools_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            match = DEVTOOLS_LINE.search(self.log.read_bytes())
            if match:
                return match.group(1).decode()
            if self._popen.poll() is not None:
                raise BrowserError(f"chromium exited with {self._popen.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no DevTools address from chromium in {timeout}s: {self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def _stop_process(self) -> None:
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # no helper outlived the browser
        # Chromium keeps its singleton socket in a folder of the system's temp dir (a path under
        # tmp_path would pass the 107 bytes a socket path may have) and a killed browser leaves it.
        link = self.dir / "profile" / "SingletonSocket"
        try:
            folder = Path(os.readlink(link)).parent
        except OSError:
            return
        if folder.name.startswith("org.chromium.Chromium.") and folder.parent == Path(tempfile.gettempdir()):
            shutil.rmtree(folder, ignore_errors=True)

    # -- protocol (on the private loop) -----------------------------------------------------------

    def _run(self, coroutine, timeout: float):
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    async def _connect(self) -> None:
        ws_url = await asyncio.get_running_loop().run_in_executor(None, self._devtools_url, 20.0)
        port = int(re.match(r"ws://[^:/]+:(\d+)/", ws_url).group(1))
        self._event_added = asyncio.Event()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        page = None
        for _ in range(100):                  # the about:blank target can lag the DevTools line
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json(content_type=None)
            page = next((t for t in targets if t.get("type") == "page"), None)
            if page:
                break
            await asyncio.sleep(0.1)
        if page is None:
            raise BrowserError(f"no page target at 127.0.0.1:{port}: {targets}")
        # Screenshots come back as one big base64 message.
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self._send("Page.enable")
        await self._send("Page.setLifecycleEventsEnabled", {"enabled": True})
        await self._send("Runtime.enable")

    async def _disconnect(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if self._session is not None:
            await self._session.close()

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                if "id" in data:
                    future = self._pending.pop(data["id"], None)
                    if future is None or future.done():
                        continue
                    if "error" in data:
                        future.set_exception(BrowserError(f"DevTools error: {data['error']}"))
                    else:
                        future.set_result(data.get("result", {}))
                elif data.get("method") == "Page.lifecycleEvent":
                    self._events.append(data["params"])
                    self._event_added.set()
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(BrowserError(f"DevTools connection closed: {self._log_tail()}"))
            self._pending.clear()

    async def _send(self, method: str, params: dict | None = None) -> dict:
        if self._reader is None or self._reader.done():
            raise BrowserError(f"DevTools connection closed: {self._log_tail()}")
        ident = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        try:
            await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params or {}}))
            return await future
        finally:
            self._pending.pop(ident, None)

    async def _open(self, url: str, timeout: float) -> None:
        reply = await self._send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise BrowserError(f"navigation to {url} failed: {reply['errorText']}")
        loader = reply.get("loaderId")
        if not loader:
            return                            # same-document navigation (only the fragment changed)

        # The load event may arrive before the navigate reply, so events are kept and matched by loader.
        async def loaded() -> None:
            while not any(e.get("loaderId") == loader and e.get("name") == "load" for e in self._events):
                self._event_added.clear()
                await self._event_added.wait()

        try:
            await asyncio.wait_for(loaded(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{url} did not finish loading in {timeout}s") from None
