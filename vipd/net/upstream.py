"""Connections to backend servers: open, greet, pipeline commands, and keep idle ones for reuse.

Rules:
- Replies are matched to commands by order (RFC 2920); each command gets a future.
- One timer per connection, re-armed per command, enforces the RFC 5321 4.5.3.2 client timeouts;
  no task or ``wait_for`` per command.
- A connection that saw any error is closed, never pooled again.
- Idle connections are reused newest first and dropped after ``idle_timeout_seconds``.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from dataclasses import dataclass

from ..errors import BackendProtocolError, BackendTimeout, BackendUnavailable
from ..smtp.client import RemoteProtocolError, ReplyReader, parse_ehlo
from ..smtp.replies import Reply

__all__ = ["Timeouts", "BackendConnection", "ConnectionPool", "open_connection"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    greeting: float = 300.0
    command: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_done: float = 600.0


class BackendConnection(asyncio.Protocol):
    """One SMTP client connection to a backend, after its greeting and EHLO."""

    def __init__(self, server_name: str, timeouts: Timeouts) -> None:
        self.server_name = server_name
        self.timeouts = timeouts
        self.transport: asyncio.Transport | None = None
        self.extensions: dict[str, str] = {}
        self.greeting: Reply | None = None
        self.transactions = 0
        self.last_used = 0.0
        self.broken = False
        self._reader = ReplyReader()
        self._waiting: collections.deque[asyncio.Future[Reply]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._drain: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._timeout = timeouts.command
        self._deadline = 0.0
        self.greeted: asyncio.Future[Reply] | None = None
        self.xclient: dict[str, str] | None = None     # the client this session last named
        self.tls = False

    # --- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        # The greeting is the first "reply" we wait for.
        self.greeted = self.expect(self.timeouts.greeting)

    def data_received(self, data: bytes) -> None:
        try:
            got = self._reader.feed(data)
        except RemoteProtocolError as exc:
            self._fail(BackendProtocolError(f"{self.server_name}: {exc}"))
            return
        for reply in got:
            if not self._waiting:
                # An unasked reply: the backend is out of step with us; never trust it again.
                self._fail(BackendProtocolError(f"{self.server_name}: unexpected reply {reply}"))
                return
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(reply)
        self._rearm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(BackendUnavailable(f"{self.server_name}: connection closed"
                                      + (f" ({exc})" if exc else "")))

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None:
            if not self._drain.done():
                self._drain.set_result(None)
            self._drain = None

    # --- commands ----------------------------------------------------------------------------
    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def alive(self) -> bool:
        return not self.broken and self.transport is not None and not self.transport.is_closing()

    def command(self, line: bytes, timeout: float | None = None) -> asyncio.Future[Reply]:
        """Write one command line; the future completes with its reply."""
        fut = self.expect(timeout if timeout is not None else self.timeouts.command)
        self.write(line)
        return fut

    def write(self, data: bytes) -> None:
        if self._error is not None or self.transport is None:
            raise self._error or BackendUnavailable(f"{self.server_name}: not connected")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._drain is not None:
            await self._drain
        if self._error is not None:
            raise self._error

    def pipeline(self, lines: list[bytes], timeout: float | None = None) -> list[asyncio.Future[Reply]]:
        """Write several commands at once (one write); their futures in order.

        Only for backends that offer PIPELINING, except a single command, which any backend takes.
        """
        if len(lines) > 1 and not self.pipelining:
            raise BackendProtocolError(f"{self.server_name}: does not offer PIPELINING")
        t = timeout if timeout is not None else self.timeouts.command
        if self._error is not None or self.transport is None:
            raise self._error or BackendUnavailable(f"{self.server_name}: not connected")
        futs = [self.expect(t) for _ in lines]
        self.transport.write(lines[0] if len(lines) == 1 else b"".join(lines))
        return futs

    async def send_group(self, lines: list[bytes], timeout: float | None = None) -> list[Reply]:
        """Send commands, pipelined when the backend offers PIPELINING; return their replies."""
        if self.pipelining:
            futs = self.pipeline(lines, timeout)
            return [await f for f in futs]
        return [await self.command(line, timeout) for line in lines]

    async def ehlo(self, name: str) -> Reply:
        reply = await self.command(f"EHLO {name}\r\n".encode("ascii"))
        if reply.code == 250:
            self.extensions = parse_ehlo(reply)
            return reply
        # RFC 5321 4.1.4: fall back to HELO for servers that do not speak ESMTP.
        reply = await self.command(f"HELO {name}\r\n".encode("ascii"))
        self.extensions = {}
        return reply

    def close(self) -> None:
        self.broken = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def quit(self) -> None:
        """Polite close for idle connections; never waits long."""
        if self.alive and not self._waiting:
            try:
                self.command(b"QUIT\r\n", timeout=2.0).add_done_callback(_ignore)
            except Exception:
                pass
        self.close()

    # --- internals ---------------------------------------------------------------------------
    def expect(self, timeout: float) -> asyncio.Future[Reply]:
        fut: asyncio.Future[Reply] = self._loop.create_future()
        if self._error is not None:
            fut.set_exception(self._error)
            return fut
        self._waiting.append(fut)
        self._arm(timeout)
        return fut

    def _arm(self, timeout: float) -> None:
        # A deadline, not a timer per command: the one timer is only moved when it fires early,
        # which keeps call_later off the per-command path.
        self._timeout = timeout
        self._deadline = deadline = self._loop.time() + timeout
        timer = self._timer
        if timer is not None and timer.when() > deadline:
            timer.cancel()          # set for a longer timeout than this command's
            timer = None
        if timer is None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _rearm(self) -> None:
        if self._waiting:
            self._deadline = self._loop.time() + self._timeout
        # With nothing awaited the timer stays, harmless: it finds no waiter when it fires.

    def _on_timer(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        self._fail(BackendTimeout(f"{self.server_name}: no reply within {self._timeout:g} s"))

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self.broken = True
        waiting, self._waiting = self._waiting, collections.deque()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()          # marked retrieved: nobody may be left to await it
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(exc)
            self._drain.exception()
        self.close()


def _ignore(fut: asyncio.Future[Reply]) -> None:
    if not fut.cancelled():
        fut.exception()


@dataclass(frozen=True, slots=True)
class BackendTls:
    """STARTTLS to a pool's servers: ``required`` fails a server that cannot do it."""

    context: ssl.SSLContext
    required: bool
    server_name: str | None = None


async def open_connection(host: str, port: int, *, server_name: str, helo_name: str,
                          timeouts: Timeouts, preamble: bytes = b"",
                          tls: BackendTls | None = None) -> BackendConnection:
    """Connect, (send ``preamble``: a PROXY header), read the greeting, say EHLO (and STARTTLS, then
    EHLO again, when ``tls`` says so); raises BackendError on any failure."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeouts.connect):
            _, conn = await loop.create_connection(lambda: BackendConnection(server_name, timeouts),
                                                   host, port)
    except TimeoutError as exc:
        raise BackendTimeout(f"{server_name}: connect timed out") from exc
    except OSError as exc:
        raise BackendUnavailable(f"{server_name}: {exc.strerror or exc}") from exc
    try:
        if preamble:
            conn.write(preamble)
        assert conn.greeted is not None
        greeting = await conn.greeted
        if greeting.code != 220:
            raise BackendUnavailable(f"{server_name}: refused with {greeting}")
        conn.greeting = greeting
        reply = await conn.ehlo(helo_name)
        if reply.code != 250:
            raise BackendUnavailable(f"{server_name}: EHLO refused with {reply}")
        if tls is not None:
            await _starttls(conn, loop, tls, host, helo_name, timeouts)
    except BaseException:
        conn.close()
        raise
    return conn


async def _starttls(conn: BackendConnection, loop, tls: BackendTls, host: str, helo_name: str,
                    timeouts: Timeouts) -> None:
    name = conn.server_name
    if "STARTTLS" not in conn.extensions:
        if tls.required:
            raise BackendUnavailable(f"{name}: STARTTLS required but not offered")
        return
    reply = await conn.command(b"STARTTLS\r\n")
    if reply.code != 220:
        if tls.required:
            raise BackendUnavailable(f"{name}: STARTTLS refused with {reply}")
        return
    assert conn.transport is not None
    try:
        async with asyncio.timeout(timeouts.greeting):
            transport = await loop.start_tls(conn.transport, conn, tls.context,
                                             server_hostname=tls.server_name or host)
    except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
        raise BackendUnavailable(f"{name}: TLS handshake failed: {exc}") from exc
    if transport is None:
        raise BackendUnavailable(f"{name}: connection lost during the TLS handshake")
    conn.transport = transport  # type: ignore[assignment]
    conn.tls = True
    # RFC 3207 4.2: what was learned in plaintext is forgotten; ask again.
    reply = await conn.ehlo(helo_name)
    if reply.code != 250:
        raise BackendUnavailable(f"{name}: EHLO after STARTTLS refused with {reply}")


class ConnectionPool:
    """Idle, greeted connections to one server, reused newest first."""

    def __init__(self, max_idle: int, idle_timeout: float, max_transactions: int) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.max_transactions = max_transactions
        self._idle: list[BackendConnection] = []

    def take(self) -> BackendConnection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.alive and now - conn.last_used < self.idle_timeout:
                return conn
            conn.close()
        return None

    def give_back(self, conn: BackendConnection) -> None:
        if (not conn.alive or conn.transactions >= self.max_transactions
                or len(self._idle) >= self.max_idle):
            asyncio.ensure_future(conn.quit())
            return
        conn.last_used = time.monotonic()
        self._idle.append(conn)

    def expire(self) -> None:
        """Close connections idle for too long (called by the daemon's periodic sweep)."""
        now = time.monotonic()
        keep = []
        for conn in self._idle:
            if conn.alive and now - conn.last_used < self.idle_timeout:
                keep.append(conn)
            else:
                asyncio.ensure_future(conn.quit())
        self._idle = keep

    def close_all(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            asyncio.ensure_future(conn.quit())

    @property
    def idle(self) -> int:
        return len(self._idle)

