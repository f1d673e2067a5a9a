"""One client transaction relayed to backends: one backend transaction ("part") per destination pool.

Rules (DESIGN.md section 2):
- A part opens at its pool's first recipient: the balancer picks a server, MAIL and the recipient go
  out pipelined, and the backend's own verdicts are the client's replies.
- The client's DATA sends DATA to every part at once and the client gets 354 at once; the body is
  kept (vipd.net.body) and written when complete, so a part can be replayed on another server of its
  pool if its backend fails before the final reply.
- The client gets 250 only when every part got 250 from a backend or is durably in the spool.
- With a spool, a part goes there instead (the failover queue): when its pool has no usable server
  or is held (its recipients are accepted without a backend), when the host is over ``queue_load``,
  and when its backend answers 4xx or is lost and no other server of the pool can take it.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import BackendError
from ..smtp import replies
from ..smtp.client import mail_command, rcpt_command, xclient_command, xforward_command
from ..smtp.commands import Address, MailFrom
from ..smtp.replies import Reply
from .body import Body
from ..balance import Backend
from .pools import Lease, PoolRuntime

__all__ = ["ClientFacts", "Part", "Transaction", "with_status"]

_BACKEND_ID = re.compile(r"queued as ([A-Za-z0-9._-]+)|^([A-Za-z0-9]{6,}) Message accepted")
DATA = b"DATA\r\n"
RSET = b"RSET\r\n"
END = b".\r\n"


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """What we know of the client, for XCLIENT and the trace header."""

    ip: str
    port: int
    helo: str
    esmtp: bool
    local: tuple[str, int] | None = None     # the VIP address the client reached (for PROXY headers)


class Spooler(Protocol):
    """Writes a part to the durable queue: its reply (``250 ... queued as``, or ``452 4.3.1``)."""

    async def spool(self, txn: Transaction, part: Part, body: Body, header: bytes) -> Reply: ...


@dataclass(slots=True)
class Part:
    pool: PoolRuntime
    rcpts: list[Address] = field(default_factory=list)
    lease: Lease | None = None
    failed: Reply | None = None
    tried: set[str] = field(default_factory=set)
    data_reply: asyncio.Future[Reply] | None = None
    result: Reply | None = None
    attempts: int = 0
    server: str = ""
    delivery_seconds: float | None = None
    spooled: bool = False            # goes to the queue, not to a backend now
    queued_as: str | None = None


class Transaction:
    """The backend side of one client transaction (MAIL to final reply)."""

    def __init__(self, qid: str, mail: MailFrom, client: ClientFacts, helo_name: str,
                 spooler: Spooler | None = None, queue_all: bool = False, vip: str = "") -> None:
        """``queue_all``: the host is over its queue_load: every part goes to the spool."""
        self.qid = qid
        self.spooler = spooler
        self.queue_all = queue_all and spooler is not None
        self.vip = vip
        self.mail = mail
        self.client = client
        self.helo_name = helo_name
        self.parts: dict[str, Part] = {}
        self.started = time.monotonic()
        self.data_started = 0.0
        self.body_done = 0.0
        self.aborted = False
        self.discarded: list[Address] = []      # recipients an access DISCARD took
    # --- envelope ----------------------------------------------------------------------------
    def rcpt(self, pool: PoolRuntime, rcpt: Address, data_next: bool = False) -> asyncio.Future[Reply]:
        """Forward one recipient; the future gives the client's reply (the backend's verdict).

        ``data_next``: the client has already pipelined DATA, so DATA goes to the backend in the same
        write (its 354 then costs no extra round trip). The common cases (a live connection, or an idle
        pooled one) are plain callbacks; connecting, XCLIENT and replays run as a task.
        """
        part = self.parts.get(pool.name)
        if part is None:
            part = self.parts[pool.name] = Part(pool, spooled=self.queue_all)
        if part.failed is not None:
            return _done(part.failed)
        if part.spooled:
            part.rcpts.append(rcpt)
            return _done(replies.RCPT_OK)
        lines = [rcpt_command(rcpt)]
        if part.lease is None:
            backend, lease = pool.lease_idle(self.client.ip, part.tried)
            if lease is None or self._needs_xclient(lease) or not lease.conn.pipelining:
                return self._task(self._open(part, rcpt, lease, backend))
            part.lease, part.server = lease, lease.backend.name
            lines = [self._mail_line(lease), *(rcpt_command(r) for r in part.rcpts), lines[0]]
        data_next = data_next and part.lease.conn.pipelining
        if data_next:
            lines.append(DATA)
        try:
            futs = part.lease.conn.pipeline(lines)
        except BackendError as exc:
            self._lost(part, exc)
            return self._task(self._add_rcpt(part, rcpt))
        if data_next:
            part.data_reply = futs.pop()
        out: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        futs[-1].add_done_callback(lambda _: self._rcpt_done(part, rcpt, futs, out))
        return out

    def _rcpt_done(self, part: Part, rcpt: Address, futs: list[asyncio.Future[Reply]],
                   out: asyncio.Future[Reply]) -> None:
        try:
            got = [f.result() for f in futs]
        except BackendError as exc:
            if part.lease is not None:
                self._lost(part, exc)
            part.data_reply = None
            _chain(self._task(self._add_rcpt(part, rcpt)), out)
            return
        if self.aborted:
            out.set_result(replies.LOCAL_ERROR)
            return
        reply = got[-1] if len(got) == 1 else self._judge_envelope(part, part.lease, got, rcpt)
        if len(got) == 1 and reply.is_positive:
            part.rcpts.append(rcpt)
        out.set_result(with_status(reply))

    def _task(self, coro) -> asyncio.Future[Reply]:
        return asyncio.ensure_future(coro)

    async def _add_rcpt(self, part: Part, rcpt: Address) -> Reply:
        if part.failed is not None:
            return part.failed
        while True:
            if part.lease is None:
                return await self._open(part, rcpt)
            try:
                reply = await part.lease.conn.command(rcpt_command(rcpt))
            except BackendError as exc:
                self._lost(part, exc)
                continue           # replay MAIL and the accepted recipients elsewhere
            if reply.is_positive:
                part.rcpts.append(rcpt)
            return with_status(reply)

    async def _open(self, part: Part, rcpt: Address | None, lease: Lease | None = None,
                    backend: Backend | None = None) -> Reply:
        """Start the part on some server: MAIL, the recipients it has, and ``rcpt`` (if any).

        ``lease`` or ``backend``: what the balancer already chose for this part, used first.
        """
        wanted = [*part.rcpts] + ([rcpt] if rcpt is not None else [])
        while True:
            if lease is None:
                lease = await part.pool.lease(self.client.ip, self.helo_name, part.tried, backend,
                                              self._preamble(part.pool))
            backend = None
            if lease is None:
                if self.spooler is not None:
                    return self._to_spool(part, rcpt)
                part.failed = replies.NO_BACKEND
                return part.failed
            if self.aborted:
                part.pool.give_back(lease, reusable=True)
                return replies.LOCAL_ERROR
            try:
                got = await self._envelope(part.pool, lease, wanted)
            except BackendError as exc:
                part.tried.add(lease.backend.name)
                part.pool.fail(lease, exc)
                lease = None
                continue
            if self.aborted:
                self._reset(part.pool, lease)
                return replies.LOCAL_ERROR
            part.lease, part.server = lease, lease.backend.name
            return self._judge_envelope(part, lease, got, rcpt)

    def _to_spool(self, part: Part, rcpt: Address | None) -> Reply:
        """No server of the pool can take this part now: it goes to the queue, the recipient is ours."""
        part.spooled = True
        if rcpt is not None and rcpt not in part.rcpts:
            part.rcpts.append(rcpt)
        return replies.RCPT_OK

    def _judge_envelope(self, part: Part, lease: Lease | None, got: list[Reply],
                        rcpt: Address | None) -> Reply:
        """Replies to MAIL, the part's accepted recipients (replayed) and ``rcpt``: the client's reply."""
        assert lease is not None
        mail_reply, rcpt_replies = got[0], got[1:]
        if mail_reply.is_transient and self.spooler is not None:
            # The backend cannot take any mail now (a 4xx to MAIL): the queue can.
            self._reset(part.pool, lease)
            part.lease = None
            return self._to_spool(part, rcpt)
        if not mail_reply.is_positive:
            part.failed = mail_reply
        elif any(not r.is_positive for r in rcpt_replies[: len(part.rcpts)]):
            # A replay that cannot carry every recipient the client was told is accepted.
            part.failed = replies.BACKEND_FAILED
        if part.failed is not None:
            part.lease = None
            self._reset(part.pool, lease)
            return with_status(part.failed)
        part.attempts += 1
        if rcpt is None:
            return mail_reply
        reply = rcpt_replies[-1]
        if reply.is_positive:
            part.rcpts.append(rcpt)
        return with_status(reply)

    async def _envelope(self, pool: PoolRuntime, lease: Lease, rcpts: list[Address]) -> list[Reply]:
        conn = lease.conn
        if lease.pool_identity == "xclient" and "XCLIENT" in conn.extensions:
            await self._xclient(lease, pool.helo(self.helo_name))
        elif lease.pool_identity == "xforward" and "XFORWARD" in conn.extensions:
            attrs = self._identity_attrs(lease, "XFORWARD")
            if attrs:
                # XFORWARD describes the next transaction only: so it goes before every MAIL.
                reply = await conn.command(xforward_command(attrs))
                if reply.code != 250:
                    conn.extensions.pop("XFORWARD", None)
        lines = [self._mail_line(lease), *(rcpt_command(r) for r in rcpts)]
        return await conn.send_group(lines)

    def _mail_line(self, lease: Lease) -> bytes:
        ext = lease.conn.extensions
        return mail_command(self.mail.address, size=self.mail.size if "SIZE" in ext else None,
                            body=self.mail.body if "8BITMIME" in ext else None)

    def _xclient_attrs(self, lease: Lease) -> dict[str, str]:
        return self._identity_attrs(lease, "XCLIENT")

    def _identity_attrs(self, lease: Lease, keyword: str) -> dict[str, str]:
        offered = set(lease.conn.extensions.get(keyword, "").upper().split())
        # No PORT for XCLIENT: with it every client session would differ and a pooled connection
        # could never skip XCLIENT for a client it already names.
        attrs = {"ADDR": self.client.ip, "NAME": "[UNAVAILABLE]", "HELO": self.client.helo,
                 "PROTO": "ESMTP" if self.client.esmtp else "SMTP", "SOURCE": "REMOTE"}
        return {k: v for k, v in attrs.items() if k in offered and v}

    def _needs_xclient(self, lease: Lease) -> bool:
        """Whether the envelope must wait for an identity command first (the slow path)."""
        if lease.pool_identity == "xforward":
            return "XFORWARD" in lease.conn.extensions
        if lease.pool_identity != "xclient" or "XCLIENT" not in lease.conn.extensions:
            return False
        return lease.conn.xclient != self._xclient_attrs(lease)

    def _preamble(self, pool: PoolRuntime) -> bytes:
        """The PROXY header for a new connection of a pool that wants one."""
        identity = pool.cfg.identity
        if identity not in ("proxy-v1", "proxy-v2"):
            return b""
        from ..proxy import build_v1, build_v2
        source, dest = (self.client.ip, self.client.port), self.client.local
        try:
            if dest is None or (":" in source[0]) != (":" in dest[0]):
                raise ValueError("no destination of the same family")
            return build_v2(source, dest) if identity == "proxy-v2" else build_v1(source, dest)
        except ValueError:
            # A client we cannot describe (no address of the same family): the balancer speaks for itself.
            return build_v2(None, None) if identity == "proxy-v2" else b"PROXY UNKNOWN\r\n"

    async def _xclient(self, lease: Lease, helo_name: str) -> None:
        """Tell the backend who the client is (unless this connection already names that client);
        the backend answers with a new greeting, so EHLO again."""
        conn = lease.conn
        attrs = self._xclient_attrs(lease)
        if not attrs or conn.xclient == attrs:
            return
        reply = await conn.command(xclient_command(attrs))
        if reply.code != 220:
            # The backend does not trust us with XCLIENT: carry on without it, and stop asking.
            conn.extensions.pop("XCLIENT", None)
            return
        await conn.ehlo(helo_name)
        conn.xclient = attrs

    def _lost(self, part: Part, exc: Exception) -> None:
        assert part.lease is not None
        part.tried.add(part.lease.backend.name)
        part.pool.fail(part.lease, exc)
        part.lease = None

    def _reset(self, pool: PoolRuntime, lease: Lease) -> None:
        """Return a connection after an abandoned transaction: RSET first, pooled only if it works."""
        try:
            fut = lease.conn.command(RSET)
        except BackendError:
            pool.give_back(lease, reusable=False)
            return
        fut.add_done_callback(lambda f: pool.give_back(
            lease, reusable=not f.exception() and f.result().code == 250))

    # --- data --------------------------------------------------------------------------------
    @property
    def accepted_rcpts(self) -> int:
        return sum(len(p.rcpts) for p in self.parts.values())

    def begin_data(self) -> None:
        """The client said DATA and will get 354: ask every live part's backend for DATA now."""
        self.data_started = time.monotonic()
        for part in self.parts.values():
            if part.rcpts and part.lease is not None and part.data_reply is None:
                try:
                    part.data_reply = part.lease.conn.command(DATA, part.lease.conn.timeouts.data_init)
                except BackendError as exc:
                    self._lost(part, exc)

    def finish(self, body: Body, header: bytes) -> asyncio.Future[Reply]:
        """The body is complete: deliver every part; the future gives the client's final reply.

        Fast path (one part on a live connection, the body in memory): when the backend's 354 is
        there, one write, then a callback for the final reply. Anything else runs as a task.
        """
        self.body_done = time.monotonic()
        parts = [p for p in self.parts.values() if p.rcpts]
        self._release_idle_parts()
        part = parts[0] if len(parts) == 1 else None
        if part is None or part.lease is None or body.spilled or part.data_reply is None or part.spooled:
            return self._task(self._finish(parts, body, header))
        out: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        lease, data_reply = part.lease, part.data_reply

        def slow() -> None:
            _chain(self._task(self._finish(parts, body, header)), out)

        def send(_: object) -> None:
            if (data_reply.exception() is not None or data_reply.result().code != 354
                    or part.lease is not lease):
                slow()                   # the slow path knows every way this can go
                return
            conn = lease.conn
            try:
                done = conn.expect(conn.timeouts.data_done)
                conn.write(b"".join((header, *body.chunks(), END)))
            except BackendError:
                slow()
                return
            started = time.monotonic()

            def delivered(_: object) -> None:
                if done.exception() is not None:
                    # Lost before the final reply: the slow path replays it elsewhere.
                    if not self.aborted:
                        self._lost(part, done.exception())
                    slow()
                    return
                part.delivery_seconds = time.monotonic() - started
                self._delivered(part, lease, done.result())
                if part.result is not None and part.result.is_transient and self.spooler is not None:
                    slow()               # the backend deferred it: the queue takes it
                    return
                out.set_result(self._verdict(parts))

            done.add_done_callback(delivered)

        if data_reply.done():
            send(None)
        else:
            data_reply.add_done_callback(send)
        return out

    async def _finish(self, parts: list[Part], body: Body, header: bytes) -> Reply:
        if len(parts) == 1:
            await self._deliver(parts[0], body, header)
        else:
            await asyncio.gather(*(self._deliver(p, body, header) for p in parts))
        if self.spooler is not None and not self.aborted:
            for part in parts:
                if part.spooled or (part.result is not None and part.result.is_transient):
                    part.spooled = True
                    part.result = await self.spooler.spool(self, part, body, header)
        return self._verdict(parts)

    def _delivered(self, part: Part, lease: Lease, final: Reply) -> None:
        lease.conn.transactions += 1
        part.pool.give_back(lease, reusable=True)
        part.lease = None
        part.result = final

    def _release_idle_parts(self) -> None:
        """Parts whose every recipient was refused hold a connection nothing will use: reset it."""
        for part in self.parts.values():
            if not part.rcpts and part.lease is not None:
                lease, part.lease = part.lease, None
                self._reset_after(part, lease)

    async def _deliver(self, part: Part, body: Body, header: bytes) -> None:
        while part.result is None and not part.spooled:
            if part.lease is None:
                reply = await self._open(part, None)
                if part.spooled:
                    return               # no server left: _finish puts it in the queue
                if not reply.is_positive:
                    part.result = reply
                    return
                part.data_reply = part.lease.conn.command(DATA, part.pool.timeouts.data_init)
            lease = part.lease
            assert lease is not None and part.data_reply is not None
            try:
                reply = await part.data_reply
                if reply.code != 354:
                    part.result = reply
                    self._reset(part.pool, lease)
                    part.lease = None
                    return
                started = time.monotonic()
                final = await self._send_body(lease, body, header)
                part.delivery_seconds = time.monotonic() - started
            except BackendError as exc:
                if self.aborted:        # we closed it: the client is gone, replay nothing
                    part.result = replies.LOCAL_ERROR
                    return
                self._lost(part, exc)
                continue
            self._delivered(part, lease, final)

    async def _send_body(self, lease: Lease, body: Body, header: bytes) -> Reply:
        conn = lease.conn
        if not body.spilled:
            # In memory: header, body and the final dot in one write.
            done = conn.expect(conn.timeouts.data_done)
            conn.write(b"".join((header, *body.chunks(), END)))
            return await done
        conn.write(header)
        for chunk in body.chunks():
            conn.write(chunk)
            await conn.drain()
        return await conn.command(END, conn.timeouts.data_done)

    def _verdict(self, parts: list[Part]) -> Reply:
        results = [p.result or replies.LOCAL_ERROR for p in parts]
        if len(results) == 1:
            return with_status(results[0])
        if all(r.code == 250 for r in results):
            return replies.OK.with_text(f"Ok: queued as {self.qid}")
        # Some part failed: the client must not hear 250. Transient beats permanent so it retries.
        failed = [r for r in results if r.code != 250]
        transient = [r for r in failed if r.is_transient]
        return with_status((transient or failed)[0])

    # --- end ---------------------------------------------------------------------------------
    def abort(self) -> None:
        """The client went away or reset: release every part without delivering anything."""
        self.aborted = True
        for part in self.parts.values():
            lease, part.lease = part.lease, None
            if lease is None:
                continue
            self._reset_after(part, lease)

    def _reset_after(self, part: Part, lease: Lease) -> None:
        data = part.data_reply
        if data is None or (data.done() and data.exception() is None and data.result().code != 354):
            self._reset(part.pool, lease)          # no DATA open on the backend: RSET and reuse
        else:
            # DATA is (or may be) open on the backend: only closing the connection abandons it safely.
            part.pool.give_back(lease, reusable=False)

    def backend_ids(self) -> str:
        """The queue ids the backends gave in their 250 (Postfix's "queued as X", sendmail's "X Message
        accepted"), so one grep follows a message from vipd's log into the backend's."""
        ids = []
        for p in self.parts.values():
            if p.result is not None and p.result.code == 250 and not p.queued_as:
                found = _BACKEND_ID.search(p.result.text)
                if found:
                    ids.append(f"{p.server}:{found.group(1) or found.group(2)}")
        return ",".join(ids)

    def servers(self) -> str:
        """The servers that carried the parts (or the queue ids that took them), for the log line."""
        return ",".join(f"{p.pool.name}/queue:{p.queued_as}" if p.queued_as else f"{p.pool.name}/{p.server}"
                        for p in self.parts.values() if p.server or p.queued_as)


def with_status(reply: Reply) -> Reply:
    """Relay a backend reply, adding a class-level enhanced code if the backend gave none."""
    if reply.status is not None:
        return reply
    return Reply(reply.code, f"{reply.code // 100}.0.0", reply.text)


def _done(reply: Reply) -> asyncio.Future[Reply]:
    fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    fut.set_result(reply)
    return fut


def _chain(src: asyncio.Future[Reply], dst: asyncio.Future[Reply]) -> None:
    def copy(_: object) -> None:
        if dst.done():
            return
        if src.exception() is not None:
            dst.set_exception(src.exception())  # type: ignore[arg-type]
        else:
            dst.set_result(src.result())
    src.add_done_callback(copy)
