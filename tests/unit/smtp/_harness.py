"""Drives a ServerConnection with a fixed answering policy and records what happens.

Shared by the SMTP unit tests (not a test module itself). The policy accepts everything the
machine leaves to the adapter and answers the rest with ``standard_reply``, as vipd's adapter does
for commands that need no backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vipd.smtp import replies
from vipd.smtp.client import ReplyReader
from vipd.smtp.commands import Data, Ehlo, Helo, MailFrom, RcptTo, StartTls, Xclient
from vipd.smtp.lines import BodyChunk
from vipd.smtp.replies import Reply
from vipd.smtp.server import (ConnectionClosed, Greeting, Limits, MessageComplete, ServerConnection,
                              Sentinel, standard_reply)

HOST = "mx.test"
BANNER = "mx.test ESMTP"


def accept_all(conn: ServerConnection, event: object) -> Reply | None:
    """The fixed policy: None for events that take no answer, else the reply to send."""
    if isinstance(event, (BodyChunk, ConnectionClosed)):
        return None
    if isinstance(event, Greeting):
        return replies.greeting(BANNER)
    if isinstance(event, Ehlo):
        return replies.ehlo_reply(HOST, conn.ehlo_keywords())
    if isinstance(event, Helo):
        return replies.helo_reply(HOST)
    if isinstance(event, MailFrom):
        return replies.SENDER_OK
    if isinstance(event, RcptTo):
        return replies.RCPT_OK
    if isinstance(event, Data):
        return replies.START_DATA
    if isinstance(event, MessageComplete):
        return event.error or replies.OK
    if isinstance(event, Xclient):
        return replies.greeting(BANNER)
    if isinstance(event, StartTls):
        return replies.READY_FOR_TLS
    reply = standard_reply(event)
    assert reply is not None, f"no standard reply for {event!r}"
    return reply


@dataclass
class Driver:
    """A server machine plus a client-side reply reader: feed bytes, read back (event, reply) pairs."""

    limits: Limits = field(default_factory=Limits)
    policy: object = accept_all
    greet: bool = True

    def __post_init__(self) -> None:
        self.conn = ServerConnection(self.limits)
        self.wire = bytearray()              # everything the server wrote
        self.trace: list[tuple[object, Reply | None]] = []
        self.reader = ReplyReader()
        self.replies: list[Reply] = []       # the wire parsed back, in order
        if self.greet:
            greeting = self.conn.pending          # pending from the start; next_event() never returns it
            assert isinstance(greeting, Greeting)
            self.answer(greeting)

    def pump(self) -> list[tuple[object, Reply | None]]:
        """Handle events until the machine needs data; return the new (event, reply) pairs."""
        start = len(self.trace)
        while True:
            event = self.conn.next_event()
            if isinstance(event, Sentinel):
                break
            self.answer(event)
        return self.trace[start:]

    def answer(self, event: object) -> None:
        reply = self.policy(self.conn, event)  # type: ignore[operator]
        if reply is not None:
            out = self.conn.send(reply)
            self.wire += out
            self.replies.extend(self.reader.feed(out))
        self.trace.append((event, reply))

    def feed(self, data: bytes) -> list[tuple[object, Reply | None]]:
        self.conn.receive_data(data)
        return self.pump()

    def eof(self) -> list[tuple[object, Reply | None]]:
        self.conn.receive_data(b"")
        return self.pump()

    def events(self, since: int = 0) -> list[object]:
        return [e for e, _ in self.trace[since:]]

    def answered(self, since: int = 0) -> list[tuple[object, Reply]]:
        return [(e, r) for e, r in self.trace[since:] if r is not None]


def normalize(trace: list[tuple[object, Reply | None]]) -> list[tuple[object, Reply | None]]:
    """Merge runs of BodyChunk events into one ('body', bytes) entry: chunk boundaries may differ."""
    out: list[tuple[object, Reply | None]] = []
    for event, reply in trace:
        if isinstance(event, BodyChunk):
            if out and isinstance(out[-1][0], tuple) and out[-1][0][0] == "body":
                out[-1] = (("body", out[-1][0][1] + event.data), None)
            else:
                out.append((("body", event.data), None))
        else:
            out.append((event, reply))
    return out


def stuff(body: bytes) -> bytes:
    """Dot-stuff a CRLF body as a client does (RFC 5321 4.5.2) and add the end marker."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = (b"." + body if body.startswith(b".") else body).replace(b"\r\n.", b"\r\n..")
    return stuffed + b".\r\n"
