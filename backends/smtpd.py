"""A small SMTP server for the project's own backends, on vipd's sans-IO machine.

The backend supplies an ``App``: what to answer to each recipient and what to do with a complete
message. XCLIENT is offered only to peers in ``xclient_from`` (Postfix's
smtpd_authorized_xclient_hosts), and then the client facts it names replace the connection's own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from vipd.smtp import replies
from vipd.smtp.commands import Address, Data, Ehlo, Helo, MailFrom, Quit, RcptTo, Rset, Xclient
from vipd.smtp.lines import BodyChunk, unstuff
from vipd.smtp.replies import Reply
from vipd.smtp.server import (ConnectionClosed, Limits, MessageComplete, ServerConnection, Sentinel,
                              standard_reply)

__all__ = ["Envelope", "App", "SmtpServerProtocol", "serve", "run_forever"]


@dataclass
class Envelope:
    client_ip: str
    client_port: int
    helo: str = ""
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    xclient: dict[str, str] = field(default_factory=dict)
    peer_ip: str = ""          # the TCP peer (the proxy, when XCLIENT named another client)
    received_at: float = 0.0
    connection: int = 0        # which TCP connection of this server's life carried the message


class App:
    """Override what a backend needs; the defaults accept everything."""

    hostname = "backend.invalid"
    limits = Limits()
    xclient_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def banner(self) -> str:
        return f"{self.hostname} ESMTP"

    def rcpt(self, env: Envelope, rcpt: Address) -> Reply:
        return replies.RCPT_OK

    def message(self, env: Envelope, body: bytes) -> Reply | Awaitable[Reply]:
        """``body`` is unstuffed, CRLF line ends, ending with CRLF (or empty)."""
        return replies.OK


_connections = itertools.count(1)


class SmtpServerProtocol(asyncio.Protocol):
    def __init__(self, app: App) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.env: Envelope | None = None
        self.chunks: list[bytes] = []
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        ip, port = transport.get_extra_info("peername")[:2]
        trusted = any(ipaddress.ip_address(ip) in net for net in self.app.xclient_from)
        limits = self.app.limits
        if trusted:
            limits = Limits(**{**{f: getattr(limits, f) for f in limits.__slots__}, "xclient": True})
        self.conn = ServerConnection(limits)
        self.env = Envelope(ip, port, peer_ip=ip, connection=next(_connections))
        self.transport.write(self.conn.send(replies.greeting(self.app.banner())))

    def data_received(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.receive_data(data)
        if not self.busy:
            self.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.receive_data(b"")
            if not self.busy:
                self.pump()

    def pump(self) -> None:
        conn = self.conn
        assert conn is not None and self.transport is not None
        while True:
            event = conn.next_event()
            if isinstance(event, Sentinel):
                return
            if isinstance(event, ConnectionClosed):
                self.transport.close()
                return
            result = self.handle(event)
            if result is None:
                continue
            if isinstance(result, Reply):
                self.write(result)
                if conn.closed:
                    self.transport.close()
                    return
                continue
            self.busy = True
            asyncio.ensure_future(self._finish(result))
            return

    async def _finish(self, pending: Awaitable[Reply]) -> None:
        try:
            reply = await pending
        except Exception as exc:  # a backend must answer, whatever its next hop did
            reply = replies.LOCAL_ERROR.with_text(f"Local error: {exc}")
        self.busy = False
        self.write(reply)
        if self.conn is not None and self.conn.closed and self.transport is not None:
            self.transport.close()
            return
        self.pump()

    def write(self, reply: Reply) -> None:
        assert self.conn is not None and self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(self.conn.send(reply))

    def handle(self, event: object) -> Reply | Awaitable[Reply] | None:
        env, conn = self.env, self.conn
        assert env is not None and conn is not None
        if isinstance(event, BodyChunk):
            self.chunks.append(event.data)
            return None
        if isinstance(event, Ehlo):
            env.helo = env.xclient.get("HELO") or event.domain
            return replies.ehlo_reply(self.app.hostname, conn.ehlo_keywords())
        if isinstance(event, Helo):
            env.helo = env.xclient.get("HELO") or event.domain
            return replies.helo_reply(self.app.hostname)
        if isinstance(event, Xclient):
            attrs = dict(event.attrs)
            env.xclient.update(attrs)
            if attrs.get("ADDR", "[UNAVAILABLE]") != "[UNAVAILABLE]":
                env.client_ip = attrs["ADDR"]
            if attrs.get("HELO", "[UNAVAILABLE]") != "[UNAVAILABLE]":
                env.helo = attrs["HELO"]
            return replies.greeting(self.app.banner())
        if isinstance(event, MailFrom):
            env.sender, env.recipients = event.address.text, []
            return replies.SENDER_OK
        if isinstance(event, RcptTo):
            reply = self.app.rcpt(env, event.address)
            if reply.is_positive:
                env.recipients.append(event.address.text)
            return reply
        if isinstance(event, Data):
            self.chunks = []
            return replies.START_DATA
        if isinstance(event, MessageComplete):
            chunks, self.chunks = self.chunks, []
            if event.error is not None:
                return event.error
            env.received_at = time.time()
            return self.app.message(env, unstuff(b"".join(chunks)))
        if isinstance(event, (Rset, Quit)):
            self.chunks = []
        return standard_reply(event, privacy=frozenset({"noexpn", "novrfy"}))


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_service(text: str, what: str = "address") -> dict:
    """A helper daemon's address (clamd, spamd), ``unix:/path`` or ``HOST:PORT``, as the keyword
    arguments their clients take; ValueError, naming ``what``, for anything else."""
    if text.startswith("unix:") and len(text) > 5:
        return {"unix_path": text[5:]}
    _, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{what} {text!r}: give unix:PATH or HOST:PORT")
    host, port_number = parse_listen(text)
    return {"host": host, "port": port_number}


async def serve(app: App, listen: str) -> asyncio.base_events.Server:
    """Start listening; prints ``listening on HOST:PORT`` (tests read the port from it)."""
    host, port = parse_listen(listen)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SmtpServerProtocol(app), host, port, reuse_address=True)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    return server


def run_forever(app: App, listen: str) -> None:
    """Serve until SIGTERM or SIGINT (on uvloop when it is installed)."""

    async def run() -> None:
        server = await serve(app, listen)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    try:
        import uvloop
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())
