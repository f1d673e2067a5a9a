"""One client transaction relayed to backends: one backend transaction ("part") per destination pool.

Rules (DESIGN.md section 2):
- A part opens at its pool's first recipient: the balancer picks a server, MAIL and the recipient go
  out pipelined, and the backend's own verdicts are the client's replies.
- The client's DATA sends DATA to every part at once and the client gets 354 at once; the body is
  kept (vipd.net.body) and written when complete, so a part can be replayed on another server of its
  pool if its backend fails before the final reply.
- The client gets 250 only when every part got 250 from a backend. Never otherwise.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ..errors import BackendError
from ..smtp import replies
from ..smtp.client import mail_command, rcpt_command, xclient_command
from ..smtp.commands import Address, MailFrom
from ..smtp.replies import Reply
from .body import Body
from .pools import Lease, PoolRuntime

__all__ = ["ClientFacts", "Part", "Transaction", "with_status"]

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


class Transaction:
    """The backend side of one client transaction (MAIL to final reply)."""

    def __init__(self, qid: str, mail: MailFrom, client: ClientFacts, helo_name: str) -> None:
        self.qid = qid
        self.mail = mail
        self.client = client
        self.helo_name = helo_name
        self.parts: dict[str, Part] = {}
        self.started = time.monotonic()
        self.data_started = 0.0
        self.body_done = 0.0
        self.aborted = False

    # --- envelope ----------------------------------------------------------------------------
    async def add_rcpt(self, pool: PoolRuntime, rcpt: Address) -> Reply:
        part = self.parts.get(pool.name)
        if part is None:
            part = self.parts[pool.name] = Part(pool)
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
            return reply

    async def _open(self, part: Part, rcpt: Address | None) -> Reply:
        """Start the part on some server: MAIL, the recipients it has, and ``rcpt`` (if any)."""
        wanted = [*part.rcpts] + ([rcpt] if rcpt is not None else [])
        while True:
            lease = await part.pool.lease(self.client.ip, self.helo_name, part.tried)
            if lease is None:
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
                continue
            if self.aborted:
                self._reset(part.pool, lease)
                return replies.LOCAL_ERROR
            mail_reply, rcpt_replies = got[0], got[1:]
            if not mail_reply.is_positive:
                self._reset(part.pool, lease)
                part.failed = mail_reply
                return mail_reply
            if any(not r.is_positive for r in rcpt_replies[: len(part.rcpts)]):
                # A replay that cannot carry every recipient the client was told is accepted.
                self._reset(part.pool, lease)
                part.failed = replies.BACKEND_FAILED
                return part.failed
            part.lease = lease
            part.server = lease.backend.name
            part.attempts += 1
            if rcpt is None:
                return mail_reply
            reply = rcpt_replies[-1]
            if reply.is_positive:
                part.rcpts.append(rcpt)
            return reply

    async def _envelope(self, pool: PoolRuntime, lease: Lease, rcpts: list[Address]) -> list[Reply]:
        conn = lease.conn
        if pool.cfg.identity == "xclient" and "XCLIENT" in conn.extensions:
            await self._xclient(lease)
        size = self.mail.size if "SIZE" in conn.extensions else None
        body = self.mail.body if "8BITMIME" in conn.extensions else None
        lines = [mail_command(self.mail.address, size=size, body=body)]
        lines += [rcpt_command(r) for r in rcpts]
        return await conn.send_group(lines)

    async def _xclient(self, lease: Lease) -> None:
        """Tell the backend who the client is; it answers with a new greeting, so EHLO again."""
        conn = lease.conn
        offered = set(conn.extensions["XCLIENT"].upper().split())
        attrs = {"ADDR": self.client.ip, "NAME": "[UNAVAILABLE]", "HELO": self.client.helo,
                 "PROTO": "ESMTP" if self.client.esmtp else "SMTP", "PORT": str(self.client.port)}
        attrs = {k: v for k, v in attrs.items() if k in offered}
        if not attrs:
            return
        reply = await conn.command(xclient_command(attrs))
        if reply.code != 220:
            # The backend does not trust us with XCLIENT: carry on without it, and stop asking.
            conn.extensions.pop("XCLIENT", None)
            return
        await conn.ehlo(self.helo_name)

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
            if part.rcpts and part.lease is not None:
                try:
                    part.data_reply = part.lease.conn.command(DATA, part.lease.conn.timeouts.data_init)
                except BackendError as exc:
                    self._lost(part, exc)

    async def finish(self, body: Body, header: bytes) -> Reply:
        """The body is complete: deliver every part; the client's final reply."""
        self.body_done = time.monotonic()
        parts = [p for p in self.parts.values() if p.rcpts]
        if len(parts) == 1:
            await self._deliver(parts[0], body, header)
        else:
            await asyncio.gather(*(self._deliver(p, body, header) for p in parts))
        return self._verdict(parts)

    async def _deliver(self, part: Part, body: Body, header: bytes) -> None:
        while part.result is None:
            if part.lease is None:
                reply = await self._open(part, None)
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
            lease.conn.transactions += 1
            part.pool.give_back(lease, reusable=True)
            part.lease = None
            part.result = final

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
            if part.data_reply is not None:
                # DATA is open on the backend: only closing the connection abandons it safely.
                part.pool.give_back(lease, reusable=False)
            else:
                self._reset(part.pool, lease)

    def servers(self) -> str:
        """The servers that carried the parts, for the log line."""
        return ",".join(f"{p.pool.name}/{p.server}" for p in self.parts.values() if p.server)


def with_status(reply: Reply) -> Reply:
    """Relay a backend reply, adding a class-level enhanced code if the backend gave none."""
    if reply.status is not None:
        return reply
    return Reply(reply.code, f"{reply.code // 100}.0.0", reply.text)
