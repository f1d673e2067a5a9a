"""One client connection to a VIP: the asyncio adapter around the sans-IO server machine.

Rules:
- The machine decides protocol; this adapter only answers events: locally for the envelope it owns,
  or with a backend's verdict through vipd.net.forward.
- Events are handled in order, one at a time. Most answers are immediate; when one needs a backend,
  a task awaits it and resumes the loop, and the machine buffers what the client pipelines meanwhile
  (reading pauses when that buffer grows past ``MAX_BUFFERED``).
- Nothing escapes a session: a bug is logged with its traceback and the client gets 421 4.3.0.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import ssl
import os
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import VipConfig
from ..log import fmt
from ..smtp import replies
from ..smtp.commands import Data, Ehlo, Helo, MailFrom, Quit, RcptTo, Rset, StartTls
from ..smtp.lines import BodyChunk
from ..smtp.replies import Reply
from ..smtp.server import (ChunkComplete, ConnectionClosed, Limits, MessageComplete, ProtocolViolation,
                           ServerConnection, Sentinel, State, standard_reply)
from .body import Body
from ..policy.limits import check_pregreet, check_refused_recipients
from ..policy.verdict import ACCEPT, Verdict
from .forward import ClientFacts, Transaction
from .screen import Screen
from .tls import TlsInfo, tls_info
from ..proxy import ProxyError, parse_proxy

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["Session", "limits_for", "new_session_id"]

MAX_BUFFERED = 256 * 1024
PROXY_TIMEOUT_SECONDS = 10.0


def _keepalive(transport: asyncio.BaseTransport) -> None:
    """TCP keepalive on client connections: a peer that vanished without a FIN is found and reaped
    in minutes, not when a two-hour default or the session timeout says so."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    except (OSError, AttributeError):
        pass


def _in_networks(ip: str, networks) -> bool:
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in networks)


class Pending:
    """An answer that needs a backend or DNS: the future, and what turns its value into the reply."""

    __slots__ = ("future", "then")

    def __init__(self, future: asyncio.Future, then: Callable[[object], Reply | Pending]) -> None:
        self.future = future
        self.then = then


def limits_for(vip: VipConfig) -> Limits:
    return Limits(max_command_line_bytes=vip.max_command_line_bytes,
                  max_text_line_bytes=vip.max_text_line_bytes,
                  max_message_bytes=vip.max_message_bytes,
                  max_recipients=vip.max_recipients,
                  reject_nul=vip.reject_nul,
                  need_helo="needmailhelo" in vip.privacy,
                  starttls=vip.tls_cert is not None,
                  chunking=vip.chunking,
                  max_errors=vip.max_errors_per_session)


def new_session_id() -> str:
    """Ten characters of base32 randomness, like a Postfix long queue id's spirit."""
    return base64.b32encode(os.urandom(5)).decode("ascii")


class Session(asyncio.Protocol):
    def __init__(self, daemon: Daemon, vip: VipConfig) -> None:
        self.daemon = daemon
        self.vip = vip
        self.log = daemon.log
        self.sid = new_session_id()
        self.conn = ServerConnection(daemon.limits[vip.name])
        self.transport: asyncio.Transport | None = None
        self.ip = "?"
        self.port = 0
        self.started = time.monotonic()
        self.last_activity = self.started
        self.txn: Transaction | None = None
        self.body: Body | None = None
        self.txn_count = 0
        self.rcpts_ok = self.rcpts_refused = 0
        self.msgs = {"relayed": 0, "queued": 0, "rejected": 0, "deferred": 0, "discarded": 0}
        self.discard = False
        self.bytes = 0
        self.term = ""
        self._busy = False
        self._paused = False
        self._closed = False
        self._lost = False
        self._out: list[bytes] = []
        self._then: Callable[[object], Reply | Pending] | None = None
        self.screen: Screen | None = None
        self._greet_timer: asyncio.TimerHandle | None = None
        self.refused_rcpts_total = 0
        self._replies = daemon.reply_counter(vip.name)
        self.tls: TlsInfo | None = None
        self._proxy_buf: bytearray | None = None      # collecting a PROXY header from a trusted balancer
        self._proxy_timer: asyncio.TimerHandle | None = None
        self.proxied_by: str | None = None

    # --- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.ip, self.port = str(peer[0]), int(peer[1])
        _keepalive(transport)
        if _in_networks(self.ip, self.vip.accept_proxy_from):
            # A trusted L4 balancer: a PROXY header first, and only then is there a client to judge.
            self._proxy_buf = bytearray()
            self._proxy_timer = asyncio.get_running_loop().call_later(PROXY_TIMEOUT_SECONDS, self._proxy_timeout)
            return
        self._begin()

    def _begin(self) -> None:
        refusal = self.daemon.admit(self)
        if refusal is not None:
            self._reply(refusal)
            self.term = "RC"
            self._close()
            return
        self.screen = self.daemon.screen(self)
        if self.vip.greet_delay_seconds > 0:
            # postscreen's pregreet test: a client that talks before the greeting is a bot.
            self._greet_timer = asyncio.get_running_loop().call_later(
                self.vip.greet_delay_seconds, self._greet)
            return
        self._greet()

    def _greet(self) -> None:
        self._greet_timer = None
        if self._closed:
            return
        verdict = check_pregreet(self.conn.buffered)
        if verdict.refuses:
            self._reply(self._refuse(verdict))
            self.term = "PC"
        else:
            self._reply(replies.greeting(self.vip.banner))
        if self.conn.closed:
            self._close()
        self._flush()
        if not self._closed and self.conn.buffered:
            self._pump()

    def data_received(self, data: bytes) -> None:
        # Command timeouts count from the last complete command: a client that trickles a byte now
        # and then cannot hold a session (slowloris). In DATA, bytes count, and a minimum rate applies.
        if self.conn.state is State.DATA:
            self.last_activity = time.monotonic()
        if self._proxy_buf is not None:
            data = self._proxy_header(data)
            if not data:
                return
        self.conn.receive_data(data)
        if not self._busy and self._greet_timer is None:
            self._pump()
        if self.conn.buffered > MAX_BUFFERED and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        # A client that pipelines without reading our replies: stop reading until it catches up,
        # so what we hold for it stays bounded.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self._paused and not self._closed:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.conn.receive_data(b"")
        if self._busy:
            return          # the pending step finishes first, then _resume ends the session
        self._pump()
        self._finish_session()

    # --- PROXY protocol from a trusted balancer -------------------------------------------------
    def _proxy_header(self, data: bytes) -> bytes:
        """Collect the PROXY header; the bytes after it (what the client sent), or b"" for now."""
        assert self._proxy_buf is not None
        self._proxy_buf += data
        try:
            parsed = parse_proxy(self._proxy_buf)
        except ProxyError as exc:
            self._proxy_refused(str(exc))
            return b""
        if parsed is None:
            return b""
        info, used = parsed
        rest = bytes(self._proxy_buf[used:])
        self._proxy_buf = None
        if self._proxy_timer is not None:
            self._proxy_timer.cancel()
            self._proxy_timer = None
        self.proxied_by = f"[{self.ip}]:{self.port}"
        if info.command == "proxy" and info.source is not None:
            self.ip, self.port = info.source
        self._begin()
        return b"" if self._closed else rest

    def _proxy_refused(self, reason: str) -> None:
        self._proxy_buf = None
        if self._proxy_timer is not None:
            self._proxy_timer.cancel()
            self._proxy_timer = None
        self.daemon.metrics.protocol_errors.labels("proxy_header").inc()
        self.log.info(f"{self.sid}: PROXY header refused " + fmt(balancer=f"[{self.ip}]:{self.port}", reason=reason))
        if self.transport is not None:
            self.transport.abort()        # no SMTP reply: the balancer did not speak SMTP
        self._closed = True

    def _proxy_timeout(self) -> None:
        self._proxy_timer = None
        if self._proxy_buf is not None:
            self._proxy_refused(f"no PROXY header within {PROXY_TIMEOUT_SECONDS:g}s")

    # --- the event loop of one session --------------------------------------------------------
    def _pump(self) -> None:
        """Handle every event the buffered input yields; replies go out in one write at the end."""
        conn = self.conn
        handled = False
        try:
            while not self._closed:
                event = conn.next_event()
                if isinstance(event, Sentinel):
                    break
                if not handled:
                    # Timeouts count from the last complete command (one clock read per batch).
                    handled = True
                    self.last_activity = time.monotonic()
                result = self._handle(event)
                if result is None:
                    continue
                if isinstance(result, Reply):
                    self._reply(result)
                    if conn.closed:
                        self._close()
                    elif conn.tls and self.tls is None:
                        self._start_tls()        # the 220 went out: nothing more is read in plaintext
                        return
                    continue
                # Pending: the answer needs a backend or DNS. Resume when it is there. Replies so far
                # wait too (RFC 2920 asks for a flush only before waiting for the client), so a
                # pipelined envelope is answered in one write.
                self._wait(result)
                return
        except Exception:
            self._crash()
            return
        self._flush()
        if self._paused and conn.buffered < MAX_BUFFERED // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def _wait(self, pending: Pending) -> None:
        self._busy = True
        self._then = pending.then
        pending.future.add_done_callback(self._resume)

    def _resume(self, fut: asyncio.Future) -> None:
        self._busy = False
        self.last_activity = time.monotonic()     # the wait for a backend is not the client's idle time
        then, self._then = self._then, None
        try:
            result = then(fut.result()) if then is not None else fut.result()
        except Exception:
            self._crash()
            return
        if isinstance(result, Pending) and not self._lost and not self._closed:
            self._wait(result)
            return
        reply = result
        if self._lost:
            self._finish_session()
            return
        if self._closed:
            return
        if self._lost:
            self._finish_session()
            return
        if self._closed:
            return
        self._reply(reply)
        if self.conn.closed:
            self._close()
            return
        self._pump()

    def _handle(self, event: object):
        """Answer one event: a Reply, an awaitable of one, or None (nothing to say)."""
        if isinstance(event, BodyChunk):
            if self.body is None:
                self._begin_body()               # the first BDAT chunk (DATA begins at its 354)
            assert self.body is not None
            self.body.append(event.data)
            return None
        if isinstance(event, ChunkComplete):
            return self._chunk_complete(event)
        if self.daemon.stopping and self.conn.state is State.READY and not isinstance(event, Quit):
            self.term = "KQ"
            return replies.SHUTTING_DOWN
        kind = type(event)
        if kind is RcptTo:
            return self._rcpt(event)
        if kind is MessageComplete:
            return self._message_complete(event)
        if kind is MailFrom:
            return self._mail(event)
        if kind is Data:
            return self._data()
        if kind is Ehlo or kind is Helo:
            return self._helo(event)
        if kind is StartTls:
            return replies.READY_FOR_TLS if self.daemon.tls_context(self.vip) else replies.TLS_NOT_AVAILABLE
        if kind is ProtocolViolation:
            self.daemon.metrics.protocol_errors.labels(event.kind).inc()
            self.log.info(f"{self.sid}: protocol error " + fmt(client=self._client(),
                          kind=event.kind, reply=str(event.reply)))
        elif kind is ConnectionClosed:
            self._end_transaction("abandoned")
            self.term = self.term or "C" + self._phase(event.in_data)
            self._close()
            return None
        elif kind is Rset or kind is Quit:
            self._end_transaction("abandoned")
            if kind is Quit:
                self.term = self.term or "--"
        return standard_reply(event, privacy=self.vip.privacy)

    # --- envelope ----------------------------------------------------------------------------
    def _helo(self, event: Helo | Ehlo) -> Reply | Pending:
        verdict = self.screen.helo(event.domain) if self.screen is not None else ACCEPT
        if isinstance(verdict, Verdict):
            return self._helo_verdict(event, verdict)
        return Pending(verdict, lambda v: self._helo_verdict(event, v))

    def _helo_verdict(self, event: Helo | Ehlo, verdict: Verdict) -> Reply:
        if verdict.refuses:
            # A refused EHLO changes nothing (the machine keeps the transaction, RFC 5321 4.1.4).
            return self._refuse(verdict, helo=event.domain)
        # RFC 5321 4.1.4: an accepted EHLO/HELO ends any transaction in progress, as RSET would.
        self._end_transaction("abandoned")
        self._count_verdict(verdict, "helo")
        if type(event) is Helo:
            return replies.helo_reply(self.vip.hostname)
        return replies.ehlo_reply(self.vip.hostname, self.conn.ehlo_keywords())

    def _local(self) -> tuple[str, int] | None:
        sock = self.transport.get_extra_info("sockname") if self.transport is not None else None
        return (str(sock[0]), int(sock[1])) if sock else None

    def _tls_required(self, domain: str | None = None) -> bool:
        """The VIP's require_tls_from (this client) or require_tls_for (this recipient domain)."""
        if self.tls is not None or self.daemon.tls_context(self.vip) is None:
            return False
        if domain is not None:
            wanted = self.vip.require_tls_for
            return bool(wanted) and any(domain == d or domain.endswith("." + d) for d in wanted)
        return _in_networks(self.ip, self.vip.require_tls_from)

    def _mail(self, event: MailFrom) -> Reply | Pending:
        if self._tls_required():
            self.log.info(f"{self.sid}: reject MAIL " + fmt(client=self._client(), check="require_tls",
                                                             reply=str(replies.TLS_REQUIRED)))
            return replies.TLS_REQUIRED
        self._end_transaction("abandoned")
        verdict = self.screen.mail(event.address) if self.screen is not None else ACCEPT
        if isinstance(verdict, Verdict):
            return self._mail_verdict(event, verdict)
        return Pending(verdict, lambda v: self._mail_verdict(event, v))

    def _mail_verdict(self, event: MailFrom, verdict: Verdict) -> Reply:
        if verdict.refuses:
            return self._refuse(verdict, sender=event.address)
        if self.txn_count >= self.vip.max_messages_per_session:
            self.term = "PM"
            self.log.info(f"{self.sid}: reject MAIL " + fmt(client=self._client(), check="max_messages_per_session",
                                                             reply=str(replies.TOO_MANY_MESSAGES)))
            return replies.TOO_MANY_MESSAGES
        self.txn_count += 1
        qid = f"{self.sid}.{self.txn_count}"
        facts = ClientFacts(self.ip, self.port, self.conn.helo or "", self.conn.esmtp, self._local())
        self.txn = Transaction(qid, event, facts, self.daemon.helo_name(self.vip), self.daemon.queue,
                               self.daemon.over_queue_load(self.vip), self.vip.name)
        self.discard = verdict.kind == "discard"
        return replies.SENDER_OK

    def _rcpt(self, event: RcptTo) -> Reply | Pending:
        if self._tls_required(event.address.domain):
            return self._refused_rcpt(event, replies.TLS_REQUIRED)
        verdict = self.screen.rcpt(event.address) if self.screen is not None else ACCEPT
        if isinstance(verdict, Verdict):
            return self._rcpt_verdict(event, verdict)
        return Pending(verdict, lambda v: self._rcpt_verdict(event, v))

    def _rcpt_verdict(self, event: RcptTo, verdict: Verdict) -> Reply | Pending:
        txn = self.txn
        assert txn is not None
        if verdict.refuses:
            return self._refused_rcpt(event, self._refuse(verdict, sender=txn.mail.address,
                                                          rcpt=event.address))
        if self.discard or verdict.kind == "discard":
            # sendmail DISCARD: accepted and thrown away; nothing goes to a backend.
            self.discard = True
            txn.discarded.append(event.address)
            self.rcpts_ok += 1
            return replies.RCPT_OK
        pool = self.daemon.route(self.vip, event.address.domain)
        fut = txn.rcpt(pool, event.address, self.conn.next_is_data())
        return Pending(fut, lambda reply: self._after_rcpt(event, reply))

    def _after_rcpt(self, event: RcptTo, reply: Reply) -> Reply:
        if reply.is_positive:
            self.rcpts_ok += 1
            return reply
        txn = self.txn
        if txn is not None:
            self.log.info(f"{txn.qid}: reject RCPT " + fmt(
                client=self._client(), reply=str(reply), **{"from": str(txn.mail.address)},
                to=str(event.address), check="backend"))
        return self._refused_rcpt(event, reply)

    def _refused_rcpt(self, event: RcptTo, reply: Reply) -> Reply:
        """Count a refused recipient; past the budget the session ends (a dictionary attack)."""
        self.rcpts_refused += 1
        self.refused_rcpts_total += 1
        verdict = check_refused_recipients(self.refused_rcpts_total, self.vip.max_refused_recipients)
        if verdict.refuses:
            self.term = "PR"
            return self._refuse(verdict, rcpt=event.address)
        return reply

    def _refuse(self, verdict: Verdict, *, helo: str | None = None, sender=None, rcpt=None) -> Reply:
        """Log and count a policy refusal; the reply to send."""
        self._count_verdict(verdict, verdict.check or "policy")
        reply = verdict.reply or replies.LOCAL_ERROR
        txn = self.txn
        qid = txn.qid if txn is not None else self.sid
        self.log.info(f"{qid}: reject " + fmt(
            client=self._client(), helo=f"<{helo or self.conn.helo or ''}>",
            **{"from": str(sender) if sender is not None else None},
            to=str(rcpt) if rcpt is not None else None, check=verdict.check, reply=str(reply)))
        if verdict.kind == "disconnect" and reply.code != 421:
            self.term = "PC"
        return reply

    def _count_verdict(self, verdict: Verdict, check: str) -> None:
        if verdict.check or verdict.kind != "accept":
            self.daemon.count_verdict(check, verdict.kind)

    def _data(self) -> Reply:
        self._begin_body()
        return replies.START_DATA

    def _begin_body(self) -> None:
        txn = self.txn
        assert txn is not None
        txn.begin_data()
        self.body = Body()

    def _chunk_complete(self, event: ChunkComplete) -> Reply | Pending:
        """One BDAT chunk read: 250 for a middle chunk; the last one ends the message like DATA's dot."""
        if self.body is None and self.txn is not None:
            self._begin_body()                   # BDAT 0 LAST: an empty message
        if not event.last and event.error is None:
            return Reply(250, "2.0.0", f"Ok: {event.size} octets received")
        if not event.last:
            self.daemon.metrics.protocol_errors.labels("bad_message").inc()
            self._end_transaction("rejected", event.error, event.total)
            return event.error  # type: ignore[return-value]
        return self._message_complete(MessageComplete(event.total, event.error))

    def _message_complete(self, event: MessageComplete) -> Reply | Pending:
        txn, body = self.txn, self.body
        assert txn is not None and body is not None
        if event.error is not None:
            self.daemon.metrics.protocol_errors.labels("bad_message").inc()
            self._end_transaction("rejected", event.error, event.size)
            return event.error
        if self.discard:
            # DISCARD takes the whole message, also for recipients a backend already accepted.
            txn.abort()
            self._end_transaction("discarded", replies.DISCARDED, event.size)
            return replies.DISCARDED
        fut = txn.finish(body, self._received_header(txn))
        return Pending(fut, lambda reply: self._after_message(event, reply))

    def _after_message(self, event: MessageComplete, reply: Reply) -> Reply:
        txn = self.txn
        if self.body is not None:
            self.body.close()
            self.body = None
        if txn is None:
            return reply
        delivery = self.daemon.metrics.backend_delivery
        for part in txn.parts.values():
            if part.delivery_seconds is not None:
                delivery.labels(part.pool.name, part.server).observe(part.delivery_seconds)
        if reply.code == 250:
            outcome = "queued" if any(p.queued_as for p in txn.parts.values()) else "relayed"
        else:
            outcome = "deferred" if reply.is_transient else "rejected"
        self._end_transaction(outcome, reply, event.size)
        return reply

    def _end_transaction(self, outcome: str, reply: Reply | None = None, size: int | None = None) -> None:
        txn, self.txn = self.txn, None
        if self.body is not None:
            self.body.close()
            self.body = None
        if txn is None:
            return
        if outcome == "abandoned":
            txn.abort()
            if txn.accepted_rcpts == 0:
                return
        else:
            self.msgs[outcome] += 1
            metrics = self.daemon.metrics
            metrics.messages.labels(outcome).inc()
            if outcome == "relayed" and size is not None:
                self.bytes += size
                metrics.message_size.observe(size)
            now = time.monotonic()
            metrics.transaction_duration.observe(now - txn.started)
        now = time.monotonic()
        data_at = txn.data_started or now
        body_at = txn.body_done or data_at
        rcpts = ",".join(str(r) for p in txn.parts.values() for r in p.rcpts)
        self.log.info(f"{txn.qid}: {outcome} " + fmt(
            client=self._client(), helo=f"<{self.conn.helo or ''}>", **{"from": str(txn.mail.address)},
            to=rcpts or None, nrcpt=txn.accepted_rcpts, size=size, servers=txn.servers() or None,
            backend_id=txn.backend_ids() or None,
            delays=f"{data_at - txn.started:.3f}/{body_at - data_at:.3f}/{now - body_at:.3f}",
            dsn=reply.status if reply else None, reply=str(reply) if reply else None))

    def _received_header(self, txn: Transaction) -> bytes:
        # RFC 3848: ESMTPS for ESMTP over TLS; the TLS clause in Postfix's wording.
        proto = ("ESMTP" if self.conn.esmtp else "SMTP") + ("S" if self.tls is not None else "")
        rcpts = [r for p in txn.parts.values() for r in p.rcpts]
        for_clause = f"\r\n\tfor {rcpts[0]}" if len(rcpts) == 1 else ""
        tls = f"\r\n\t{self.tls.received_clause()}" if self.tls is not None else ""
        return (f"Received: from {self.conn.helo or 'unknown'} ([{self.ip}]){tls}\r\n"
                f"\tby {self.vip.hostname} (vipd) with {proto} id {txn.qid}{for_clause};\r\n"
                f"\t{self.daemon.date_header()}\r\n").encode("ascii", "replace")

    # --- STARTTLS ------------------------------------------------------------------------------
    def _start_tls(self) -> None:
        """The client got 220 to STARTTLS: hand the connection to TLS before reading another byte."""
        self._flush()
        transport = self.transport
        ctx = self.daemon.tls_context(self.vip)
        if transport is None or ctx is None or transport.is_closing():
            self._close()
            return
        if self.conn.discarded_after_starttls:
            self.log.warning(f"{self.sid}: discarded plaintext pipelined after STARTTLS " + fmt(
                client=self._client(), bytes=self.conn.discarded_after_starttls))
        self._busy = True
        transport.pause_reading()
        task = asyncio.ensure_future(self._handshake(transport, ctx))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _handshake(self, transport: asyncio.Transport, ctx) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(transport, self, ctx, server_side=True,
                                                 ssl_handshake_timeout=self.vip.command_timeout_seconds)
        except (OSError, ConnectionError, TimeoutError, ssl.SSLError, RuntimeError) as exc:
            self.daemon.metrics.tls_failures.labels(self.vip.name).inc()
            self.log.info(f"{self.sid}: TLS handshake failed " + fmt(client=self._client(),
                                                                    reason=f"{type(exc).__name__}: {exc}"))
            self.term = self.term or "TF"
            self._busy = False
            if not transport.is_closing():
                transport.abort()
            self._close()
            self._finish_session()
            return
        if tls_transport is None:            # the connection went away during the handshake
            self._busy = False
            self._finish_session()
            return
        self.transport = tls_transport  # type: ignore[assignment]
        self.tls = tls_info(tls_transport.get_extra_info("ssl_object"))
        self.daemon.metrics.tls_sessions.labels(self.vip.name, self.tls.version if self.tls else "?").inc()
        self.log.info(f"{self.sid}: TLS " + fmt(client=self._client(), version=self.tls and self.tls.version,
                                                cipher=self.tls and self.tls.cipher,
                                                client_cert=self.tls and self.tls.peer_subject))
        self._busy = False
        self.last_activity = time.monotonic()
        self._pump()

    # --- output and end ----------------------------------------------------------------------
    def _reply(self, reply: Reply) -> None:
        # Replies are corked and written once per batch of input: one syscall for a pipelined group.
        self._out.append(self.conn.send(reply) if self.conn.pending is not None else self.conn.close(reply))
        self._replies(reply.code)

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(out[0] if len(out) == 1 else b"".join(out))

    def say_and_close(self, reply: Reply, term: str) -> None:
        """Close out of turn (timeouts, shutdown, too many sessions), abandoning any transaction."""
        if self._closed:
            return
        self.term = self.term or term
        self._end_transaction("abandoned")
        self._out.append(self.conn.close(reply))
        self._replies(reply.code)
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._flush()
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    def _crash(self) -> None:
        self.log.error(f"{self.sid}: internal error " + fmt(client=self._client())
                       + "\n" + traceback.format_exc().rstrip())
        self.term = "IQ" if not self.term else self.term
        self.say_and_close(replies.INTERNAL, "I" + self._phase(False))

    def _finish_session(self) -> None:
        if self._greet_timer is not None:
            self._greet_timer.cancel()
            self._greet_timer = None
        if self._proxy_timer is not None:
            self._proxy_timer.cancel()
            self._proxy_timer = None
        if self.screen is not None:
            self.screen.close()
        if self.daemon.release(self) is False:
            return          # never admitted
        self._end_transaction("abandoned")
        self._closed = True
        duration = time.monotonic() - self.started
        self.daemon.metrics.session_duration.observe(duration)
        m = self.msgs
        self.log.info(f"{self.sid}: session " + fmt(
            client=self._client(), via=self.proxied_by, tls=self.tls.version if self.tls else None,
            helo=f"<{self.conn.helo or ''}>", txns=self.txn_count,
            rcpts=f"{self.rcpts_ok}/{self.rcpts_refused}",
            msgs=f"{m['relayed'] + m['queued']}/{m['rejected']}/{m['deferred']}", bytes=self.bytes,
            term=self.term or "--", duration_seconds=f"{duration:.3f}"))

    # --- timeouts and shutdown (called by the daemon's sweep) --------------------------------
    def idle_for(self, now: float) -> float:
        if self._busy or self.conn.pending is not None:
            return 0.0
        return now - self.last_activity

    def check_timeouts(self, now: float) -> None:
        if self._closed:
            return
        if self._busy:
            return          # waiting for a backend, whose own timeouts bound the wait
        if now - self.started > self.vip.session_timeout_seconds:
            self.say_and_close(replies.SESSION_TIMEOUT, "c" + self._phase(False))
            return
        in_data = self.conn.state is State.DATA
        limit = self.vip.data_timeout_seconds if in_data else self.vip.command_timeout_seconds
        rate = self.vip.min_data_rate_bytes_per_second
        txn = self.txn
        if in_data and rate and txn is not None and txn.data_started and self.body is not None:
            elapsed = now - txn.data_started
            if elapsed > self.vip.min_data_rate_grace_seconds and self.body.size < rate * elapsed:
                self.log.info(f"{txn.qid}: data too slow " + fmt(client=self._client(), bytes=self.body.size,
                                                                 seconds=f"{elapsed:.0f}"))
                self.say_and_close(replies.DATA_TOO_SLOW, "cD")
                return
        if self.idle_for(now) > limit:
            reply = replies.DATA_TIMEOUT if in_data else replies.COMMAND_TIMEOUT
            self.say_and_close(reply, "c" + self._phase(in_data))

    def stop_if_idle(self) -> None:
        """Called when the daemon stops: a session between transactions is closed now."""
        if not self._closed and not self._busy and self.conn.state is State.READY \
                and self.conn.pending is None:
            self.say_and_close(replies.SHUTTING_DOWN, "KQ")

    # --- helpers -----------------------------------------------------------------------------
    def _client(self) -> str:
        return f"[{self.ip}]:{self.port}"

    def _phase(self, in_data: bool) -> str:
        if in_data:
            return "D"
        state = self.conn.state
        if state is State.CONNECT:
            return "C"
        if state in (State.MAIL, State.RCPT):
            return "R"
        if state is State.DATA:
            return "D"
        return "M" if self.conn.helo else "H"
