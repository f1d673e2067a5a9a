"""Drives a ServerConnection as the daemon does, under an answering policy, and checks what it says.

Shared by the stateful session test and the fuzz target; not a test module itself. Any exception that
escapes ``Session.feed`` or ``Session.eof`` is a finding: the machine documents none for any input,
and ``LocalProtocolError`` only for misuse, which the driver provokes on purpose and expects.

The policy is a few numbers, and decides each command from a seeded hash of its text, so replaying
the same bytes cut differently must give the same events and the same wire.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from vipd.smtp import replies
from vipd.smtp.client import ReplyReader
from vipd.smtp.commands import Data, Ehlo, Helo, MailFrom, Quit, RcptTo, Rset, StartTls, Xclient
from vipd.smtp.lines import BodyChunk, unstuff
from vipd.smtp.replies import Reply
from vipd.smtp.server import (NEED_DATA, ChunkComplete, ConnectionClosed, Greeting, Limits,
                              LocalProtocolError, MessageComplete, ProtocolViolation, ServerConnection,
                              Sentinel, State, standard_reply)

HOST = "mx.test"
BANNER = "mx.test ESMTP"
MAX_REPLY_LINE = 512                  # RFC 5321 4.5.3.1.5, CRLF included
END_OF_DATA = b"\r\n.\r\n"

# Answers a screen or a backend may give; tests may build replies, the daemon takes them from replies.py.
REFUSALS = (
    Reply(550, "5.7.1", "Access denied"),
    Reply(450, "4.7.1", "Try again later"),
    replies.LOCAL_ERROR,
    Reply(554, "5.7.1", "Rejected by policy"),
)
NO_SERVICE = Reply(554, "5.3.2", "No SMTP service here")
MESSAGE_REFUSED = Reply(554, "5.7.1", "Message content rejected")
DISCONNECT = replies.SHUTTING_DOWN

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?", re.DOTALL)
_STATUS = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}")
_TEXT = re.compile(rb"[\t\x20-\x7e]*")


@dataclass(frozen=True)
class Policy:
    """What the daemon's screen and backends would answer, as a pure function of the command.

    Each ``refuse_*`` share is out of 8: that many eighths of all values are refused, picked by a hash
    seeded with ``seed`` (so a drawn policy is a drawn rule, not a drawn sequence of answers).
    """

    seed: int = 0
    greet: bool = True                 # False: the banner is a 554 and the session ends
    refuse_helo: int = 0
    refuse_mail: int = 0
    refuse_rcpt: int = 0
    drop_rcpt: int = 0                 # recipients answered 421: a check that ends the session
    refuse_data: bool = False          # DATA answered 451 (no backend) instead of 354
    refuse_message: int = 0            # complete messages answered 554
    refuse_tls: bool = False           # STARTTLS answered 454 instead of 220
    probe_misuse: bool = False         # also misuse the machine and expect LocalProtocolError

    @classmethod
    def from_bytes(cls, raw: bytes) -> Policy:
        """Four bytes to a policy (for the fuzzer, whose input is bytes only)."""
        b = raw[:4].ljust(4, b"\0")
        return cls(seed=b[0], refuse_helo=b[1] & 7, refuse_mail=(b[1] >> 3) & 7,
                   refuse_rcpt=b[2] & 7, refuse_message=(b[2] >> 3) & 7, refuse_data=b[2] & 0x40 != 0,
                   probe_misuse=b[2] & 0x80 != 0, drop_rcpt=b[3] & 3, greet=(b[3] >> 2) & 7 != 7,
                   refuse_tls=b[3] & 0x20 != 0)

    def says_no(self, kind: str, text: str, share: int) -> bool:
        return share > 0 and self._hash(kind, text) % 8 < share

    def refusal(self, kind: str, text: str) -> Reply:
        return REFUSALS[(self._hash(kind, text) >> 3) % len(REFUSALS)]

    def _hash(self, kind: str, text: str) -> int:
        return zlib.crc32(f"{kind}\0{text}".encode("utf-8", "surrogatepass"), self.seed)


def limits_from_bytes(raw: bytes) -> Limits:
    """Two bytes to limits small enough that a short input reaches every one of them."""
    b = raw[:2].ljust(2, b"\0")
    return Limits(max_command_line_bytes=(64, 512, 2048, 100)[b[0] & 3],
                  max_text_line_bytes=(1000, 20, 78, 0)[(b[0] >> 2) & 3],
                  max_message_bytes=(2000, 10, 300, 1 << 20)[(b[0] >> 4) & 3],
                  max_recipients=(100, 1, 2, 5)[b[0] >> 6],
                  reject_nul=b[1] & 1 == 0, need_helo=b[1] & 2 == 0,
                  max_errors=(20, 3, 8, 50)[(b[1] >> 2) & 3], xclient=b[1] & 0x10 != 0,
                  starttls=b[1] & 0x20 != 0, chunking=b[1] & 0x40 != 0)


@dataclass(frozen=True)
class Delivered:
    """A message the machine and the policy both accepted: what would go to a backend."""

    sender: str
    rcpts: tuple[str, ...]
    body: bytes
    size: int


class Session:
    """One ServerConnection and the adapter's own view of the session, checked after every event."""

    def __init__(self, limits: Limits, policy: Policy):
        self.limits = limits
        self.policy = policy
        self.conn = ServerConnection(limits)
        self.stream = bytearray()             # what the client sent up to its EOF, for replays
        self.handshakes: list[int] = []       # stream offsets where STARTTLS was answered 220
        self.timed_out_at: int | None = None  # stream offset where we closed out of turn
        self.eof_sent = False
        self.trace: list[tuple[object, Reply | None]] = []
        self.wire = bytearray()
        self.reader = ReplyReader()
        self.gone = False                     # a 421 or 221 went out, or the banner refused service
        self.ended = False                    # ConnectionClosed was handed out
        self.buffered_when_closed: int | None = None
        # The transaction as the adapter keeps it: only what the policy accepted.
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.body: list[bytes] | None = None  # chunks since the 354, or since the first BDAT chunk
        self.bdat = False                     # the message comes in BDAT chunks (RFC 3030)
        self.messages = 0
        self.delivered: list[Delivered] = []
        self.data_next = False                # the machine's hint, at the last RCPT, that DATA follows
        greeting = self.conn.pending          # pending from the start; next_event() never returns it
        assert isinstance(greeting, Greeting), greeting
        self._answer(greeting)

    # --- input -----------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if not data:
            return                            # b"" would mean EOF to the machine: eof() says that
        if not self.eof_sent:
            self.stream += data
        self.conn.receive_data(data)
        self.pump()

    def feed_in_chunks(self, data: bytes, sizes: list[int] | None, *, until_handshake: bool = False) -> None:
        """Feed ``data`` cut at the given sizes (cycled; None: whole), pumping after each piece as the
        daemon does. ``until_handshake``: stop at a STARTTLS 220, as a client waits for it before TLS."""
        i = k = 0
        handshakes = len(self.handshakes)
        while i < len(data):
            step = max(1, sizes[k % len(sizes)]) if sizes else len(data)
            self.feed(data[i:i + step])
            i += step
            k += 1
            if until_handshake and len(self.handshakes) > handshakes:
                return

    def eof(self) -> None:
        self.eof_sent = True
        self.conn.receive_data(b"")
        self.pump()

    def time_out(self, reply: Reply = replies.COMMAND_TIMEOUT) -> None:
        """Say goodbye out of turn, as the daemon does on a timeout or at shutdown."""
        if self.gone or self.ended:
            return
        out = self.conn.close(reply)
        self._check_wire(None, reply, out)
        self.trace.append(("closed by us", reply))
        self.timed_out_at = len(self.stream)
        self.gone = True
        assert self.conn.closed and self.conn.pending is None, "close() left the machine open"
        self.pump()

    def pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if isinstance(event, Sentinel):
                # The driver answers every event at once, so the machine never waits on it.
                assert event is NEED_DATA, event
                break
            assert not self.gone, f"{event!r} handed out after the session said goodbye"
            assert not self.ended, f"{event!r} handed out after ConnectionClosed"
            self._answer(event)
        if self.policy.probe_misuse:
            self._expect_misuse(replies.OK)   # nothing is pending: answering is a bug of ours
        self._check_buffer()

    # --- the adapter -----------------------------------------------------------------------------
    def _answer(self, event: object) -> None:
        self._check_event(event)
        reply = self.decide(event)
        if reply is not None:
            if self.policy.probe_misuse and isinstance(event, Data):
                self._expect_misuse(replies.OK)   # DATA is answered 354 or an error, never 250
            held = self.conn.buffered
            out = self.conn.send(reply)
            self._check_wire(event, reply, out)
            if isinstance(event, StartTls) and reply.code == 220:
                # RFC 3207 4.2 and CVE-2011-0411: plaintext pipelined behind STARTTLS is dropped.
                assert self.conn.buffered == 0, "plaintext kept past STARTTLS"
                assert self.conn.discarded_after_starttls == held, (self.conn.discarded_after_starttls, held)
                self.handshakes.append(len(self.stream))
        self.trace.append((event, reply))
        self._after(event, reply)

    def decide(self, event: object) -> Reply | None:
        """The policy's answer, as the daemon's session gives it; None for events that take none."""
        p = self.policy
        if isinstance(event, (BodyChunk, ConnectionClosed)):
            return None
        if isinstance(event, Greeting):
            return replies.greeting(BANNER) if p.greet else NO_SERVICE
        if isinstance(event, (Helo, Ehlo)):
            if p.says_no("helo", event.domain, p.refuse_helo):
                return p.refusal("helo", event.domain)
            if isinstance(event, Helo):
                return replies.helo_reply(HOST)
            return replies.ehlo_reply(HOST, self.conn.ehlo_keywords())
        if isinstance(event, MailFrom):
            text = event.address.text
            return p.refusal("mail", text) if p.says_no("mail", text, p.refuse_mail) else replies.SENDER_OK
        if isinstance(event, RcptTo):
            text = event.address.text
            if p.says_no("drop", text, p.drop_rcpt):
                return DISCONNECT
            return p.refusal("rcpt", text) if p.says_no("rcpt", text, p.refuse_rcpt) else replies.RCPT_OK
        if isinstance(event, Data):
            return replies.NO_BACKEND if p.refuse_data else replies.START_DATA
        if isinstance(event, (MessageComplete, ChunkComplete)):
            if event.error is not None:
                return event.error
            if isinstance(event, ChunkComplete) and not event.last:
                return Reply(250, "2.0.0", f"Ok: {event.size} octets received")   # as the daemon says
            self.messages += 1
            return MESSAGE_REFUSED if p.says_no("message", str(self.messages), p.refuse_message) else replies.OK
        if isinstance(event, Xclient):
            return replies.greeting(BANNER)
        if isinstance(event, StartTls):
            return replies.TLS_NOT_AVAILABLE if p.refuse_tls else replies.READY_FOR_TLS
        # Commands added to the machine later are refused as not offered until the driver learns
        # them; the machine must still take that answer.
        return standard_reply(event) or replies.NOT_IMPLEMENTED

    # --- invariants ------------------------------------------------------------------------------
    def _check_event(self, event: object) -> None:
        """What may reach the policy at this point, given what the policy accepted so far."""
        if isinstance(event, (BodyChunk, ChunkComplete)) and self.body is None:
            # The first sign of a BDAT message: the machine reads chunks only in a transaction.
            assert self.sender is not None and self.rcpts, "BDAT content without accepted MAIL and RCPT"
            assert self.limits.chunking, "BDAT read though CHUNKING is off"
            self.body, self.bdat = [], True
        if isinstance(event, BodyChunk):
            assert event.data, "an empty body chunk"
            self.body.append(event.data)
            return
        if self.body is not None and not self.bdat:
            assert isinstance(event, (MessageComplete, ConnectionClosed)), f"{event!r} inside DATA"
        if self.data_next:
            # The relay pipelines DATA to backends on this hint: it must not have lied.
            self.data_next = False
            assert isinstance(event, (Data, ProtocolViolation)), f"next_is_data() was true, then {event!r}"
        if self.bdat:
            # Between chunks only what does not start or end a transaction may reach the policy.
            assert not isinstance(event, (MailFrom, RcptTo, Data, Helo, Ehlo, MessageComplete, StartTls,
                                          Xclient)), f"{event!r} inside a BDAT message"
        if isinstance(event, Greeting):
            assert not self.trace, "a second greeting"
        elif isinstance(event, MailFrom):
            assert self.sender is None, "MAIL reached the policy inside a transaction"
            assert self.conn.helo is not None or not self.limits.need_helo, "MAIL before HELO/EHLO"
        elif isinstance(event, RcptTo):
            assert self.sender is not None, "RCPT reached the policy without an accepted MAIL"
            assert len(self.rcpts) < self.limits.max_recipients, "RCPT past max_recipients"
            self.data_next = self.conn.next_is_data()
        elif isinstance(event, Data):
            assert self.sender is not None and self.rcpts, "DATA reached the policy without accepted MAIL and RCPT"
        elif isinstance(event, MessageComplete):
            assert self.body is not None and not self.bdat, "message end without a 354"
            assert self.sender is not None and self.rcpts, "a message without accepted MAIL and RCPT"
            assert self.conn.rcpt_count == len(self.rcpts), (self.conn.rcpt_count, self.rcpts)
            if event.error is None:
                self._check_message(event.size)
        elif isinstance(event, ChunkComplete):
            assert self.conn.rcpt_count == len(self.rcpts), (self.conn.rcpt_count, self.rcpts)
            if event.last and event.error is None:
                self._check_message(event.total)
        elif isinstance(event, ProtocolViolation):
            assert isinstance(event.reply, Reply) and event.kind, event
        elif isinstance(event, ConnectionClosed):
            assert event.in_data == (self.body is not None and not self.bdat), event

    def _check_message(self, size: int) -> None:
        """A body the machine lets through is unambiguous DATA wire form, within every limit.

        A DATA body must be exactly what the client sent; a BDAT one is converted (dot-stuffed, and
        CRLF added at the end when missing), so its size may be 2 short of the unstuffed body.
        """
        body = b"".join(self.body or [])
        lim = self.limits
        assert body == b"" or body.endswith(b"\r\n"), body[-20:]
        crlf = body.count(b"\r\n")
        assert body.count(b"\r") == crlf == body.count(b"\n"), "bare CR or LF in an accepted body"
        assert END_OF_DATA not in b"\r\n" + body, "an end-of-data line inside an accepted body"
        assert not (lim.reject_nul and b"\x00" in body), "NUL in an accepted body"
        assert len(unstuff(body)) - size in ((0, 2) if self.bdat else (0,)), (size, len(unstuff(body)))
        assert size <= lim.max_message_bytes, size
        if lim.max_text_line_bytes:
            for line in body.split(b"\r\n")[:-1]:
                # RFC 5321 4.5.3.1.6: the dot added for transparency is not counted. For BDAT this
                # includes the CRLF the conversion adds to an unterminated last line.
                assert len(line) + 2 - line.startswith(b".") <= lim.max_text_line_bytes, (
                    f"a line of {len(line) + 2} octets with CRLF forwarded, limit {lim.max_text_line_bytes}")
        if not self.bdat:
            assert body + b".\r\n" in self.stream, "the body is not what the client sent"

    def _check_wire(self, event: object, reply: Reply, out: bytes) -> None:
        assert 200 <= reply.code <= 599, reply
        bare = reply.code in (220, 354) or (isinstance(event, (Helo, Ehlo)) and reply.code == 250)
        if not bare:
            # RFC 3463 codes on everything but the banner, HELO/EHLO and 354 (replies.py says so).
            assert reply.status is not None, f"{reply} has no enhanced status code"
        if reply.status is not None:
            assert _STATUS.fullmatch(reply.status) and reply.status[0] == str(reply.code)[0], reply
        assert out.endswith(b"\r\n"), out
        lines = out[:-2].split(b"\r\n")
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            assert len(line) + 2 <= MAX_REPLY_LINE, f"reply line of {len(line) + 2} octets"
            match = _REPLY_LINE.fullmatch(line)
            assert match is not None and int(match[1]) == reply.code, line
            assert match[2] == (b" " if last else b"-") or (last and match[2] is None), line
            assert _TEXT.fullmatch(match[3] or b""), f"not printable US-ASCII: {line!r}"
            if reply.status is not None:
                assert (match[3] or b"").startswith(reply.status.encode()), line
        assert self.reader.feed(out) == [reply], out
        self.wire += out

    def _after(self, event: object, reply: Reply | None) -> None:
        if reply is not None and (reply.code == 421 or isinstance(event, Quit)
                                  or (isinstance(event, Greeting) and reply.code != 220)):
            self.gone = True
        if isinstance(event, ConnectionClosed):
            self.ended = True
            self.body = None
        ok = reply is not None and reply.is_positive
        if isinstance(event, (Helo, Ehlo)):
            if ok:            # RFC 5321 4.1.4: an accepted HELO/EHLO resets like RSET; a refused one does not
                self._reset()
        elif isinstance(event, MailFrom):
            if ok:
                self.sender, self.rcpts = event.address.text, []
        elif isinstance(event, RcptTo):
            if ok:
                self.rcpts.append(event.address.text)
        elif isinstance(event, Data):
            if reply is not None and reply.code == 354:
                self.body = []
        elif isinstance(event, (MessageComplete, ChunkComplete)):
            last = isinstance(event, MessageComplete) or event.last
            size = event.size if isinstance(event, MessageComplete) else event.total
            if last and event.error is None and reply is not None and reply.code == 250:
                assert self.sender is not None
                body = b"".join(self.body or [])
                self.delivered.append(Delivered(self.sender, tuple(self.rcpts), body, size))
            if last or event.error is not None or not ok:
                self._reset()       # RFC 3030 4.2: a refused chunk fails the whole message
        elif isinstance(event, Rset) or (isinstance(event, (Xclient, StartTls)) and reply is not None
                                         and reply.code == 220):
            self._reset()           # XCLIENT and STARTTLS restart the session (RFC 3207 4.2)
        if self.gone:
            assert self.conn.closed, f"the machine is still open after {reply}"
        elif not self.ended:
            assert not self.conn.closed, f"the machine closed after {event!r} answered {reply}"
            in_txn = self.conn.state in (State.MAIL, State.RCPT, State.DATA, State.BDAT)
            assert in_txn == (self.sender is not None), f"{self.conn.state} after {event!r} answered {reply}"

    def _reset(self) -> None:
        self.sender, self.rcpts, self.body, self.bdat = None, [], None, False

    def _check_buffer(self) -> None:
        """Bounded memory: a partial command line at most, or the few bytes that may start CRLF.CRLF."""
        held = self.conn.buffered
        if self.conn.closed:
            # What was left when it closed is never read; what comes after must not pile up on it.
            if self.buffered_when_closed is None:
                self.buffered_when_closed = held
            assert held <= self.buffered_when_closed, (
                f"a closed session holds {held} bytes, {self.buffered_when_closed} when it closed")
            return
        if self.body is not None and not self.bdat:
            assert held <= len(END_OF_DATA), f"{held} bytes held in DATA"
        else:
            assert held <= self.limits.max_command_line_bytes, f"{held} bytes held between commands"

    def _expect_misuse(self, reply: Reply) -> None:
        conn = self.conn
        closed, pending, held = conn.closed, conn.pending, conn.buffered
        try:
            conn.send(reply)
        except LocalProtocolError:
            pass
        else:
            raise AssertionError(f"send({reply}) with {pending!r} pending was not refused")
        assert (conn.closed, conn.pending, conn.buffered) == (closed, pending, held), "misuse changed the machine"


def comparable(trace: list[tuple[object, Reply | None]]) -> list[tuple[object, Reply | None]]:
    """The trace with body chunks joined, and without the bodies of refused or unfinished messages
    (or BDAT chunks).

    How much of a refused message was handed out before the fault depends on where TCP cut it; the
    adapter throws that part away, so only accepted bodies must match.
    """
    out: list[tuple[object, Reply | None]] = []
    for event, reply in trace:
        if isinstance(event, BodyChunk):
            if out and isinstance(out[-1][0], tuple):
                out[-1] = (("body", out[-1][0][1] + event.data), None)
            else:
                out.append((("body", event.data), None))
            continue
        accepted = isinstance(event, (MessageComplete, ChunkComplete)) and event.error is None
        if out and isinstance(out[-1][0], tuple) and not accepted:
            out.pop()
        out.append((event, reply))
    if out and isinstance(out[-1][0], tuple):
        out.pop()
    return out


def replay(session: Session, sizes: list[int] | None = None) -> Session:
    """The same client bytes, cut at ``sizes`` (whole when None), into a fresh machine and policy.

    A STARTTLS 220 is a barrier: the client sends nothing more until the handshake, so the bytes up to
    each one are replayed on their own, and whatever follows the 220 in them is dropped again.
    """
    again = Session(session.limits, session.policy)
    stream = bytes(session.stream)
    stop = len(stream) if session.timed_out_at is None else session.timed_out_at
    start = 0
    for end in session.handshakes:
        again.feed_in_chunks(stream[start:end], sizes, until_handshake=True)
        start = end
    again.feed_in_chunks(stream[start:stop], sizes)
    if session.timed_out_at is not None:
        again.time_out()
        again.feed(stream[stop:])
    if session.eof_sent:
        again.eof()
    return again


def assert_same_session(a: Session, b: Session) -> None:
    """TCP segmentation must change nothing: same events, same verdicts, same wire, same deliveries."""
    assert comparable(a.trace) == comparable(b.trace)
    assert a.wire == b.wire
    assert a.delivered == b.delivered
