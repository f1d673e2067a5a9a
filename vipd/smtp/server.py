"""The server side of an SMTP session as a pure state machine: bytes in, events out, replies back.

Rules:
1. Everything that changes session state lives here; the adapter only decides replies.
2. One reply per command, in order (RFC 2920): after a command event the machine pauses until the
   adapter answers it with ``send()``, and it reads nothing further meanwhile.
3. A (state, command) pair that RFC 5321 forbids is answered by the machine itself with a
   ``ProtocolViolation`` event carrying the reply; the adapter sends it like any other.
4. Any input, however hostile, yields events and replies, never an exception. Only our own code
   misusing the machine raises ``LocalProtocolError``.

Usage::

    conn = ServerConnection(Limits())
    out = conn.send(replies.greeting("mx.example ESMTP"))
    conn.receive_data(chunk)                 # b"" means EOF
    while not isinstance(event := conn.next_event(), Sentinel):
        ...                                  # answer command events with conn.send(reply)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import replies
from .commands import (Bdat, Command, Data, Ehlo, Expn, Helo, Help, MailFrom, Noop, Quit, RcptTo, Rset, StartTls,
                       Unknown, Vrfy, Xclient, parse_command)
from .lines import BodyChunk, ChunkReader, DataReader, LineReader
from .replies import Reply

__all__ = [
    "State",
    "Limits",
    "ServerConnection",
    "Sentinel",
    "NEED_DATA",
    "PAUSED",
    "Greeting",
    "ProtocolViolation",
    "MessageComplete",
    "ChunkComplete",
    "ConnectionClosed",
    "BodyChunk",
    "LocalProtocolError",
    "standard_reply",
]


class State(enum.Enum):
    CONNECT = "connect"      # greeting not yet sent
    READY = "ready"          # no transaction
    MAIL = "mail"            # sender given
    RCPT = "rcpt"            # at least one recipient accepted
    DATA = "data"            # reading the body
    BDAT = "bdat"            # between BDAT chunks of one message
    CLOSED = "closed"


class Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = Sentinel("NEED_DATA")   # nothing to do until more bytes arrive
PAUSED = Sentinel("PAUSED")         # waiting for the adapter to answer the last event


class LocalProtocolError(Exception):
    """Our own code used the machine out of turn (a bug, never the peer's fault)."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_command_line_bytes: int = 2048    # including CRLF, as RFC 5321 4.5.3.1.4 counts it
    max_text_line_bytes: int = 1000       # including CRLF; 0 disables the check
    max_message_bytes: int = 10 * 1024 * 1024
    max_recipients: int = 100
    reject_nul: bool = True
    need_helo: bool = True                # sendmail's needmailhelo
    max_errors: int = 20                  # Postfix smtpd_hard_error_limit
    xclient: bool = False                 # offer XCLIENT (only ever to trusted peers)
    starttls: bool = False                # offer STARTTLS (RFC 3207)
    chunking: bool = False                # offer CHUNKING: BDAT (RFC 3030)


@dataclass(frozen=True, slots=True)
class Greeting:
    """Stands for the connection's start; answered with the 220 banner (or 421/554)."""


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The client broke the protocol; send ``reply`` (the machine already chose it)."""

    reply: Reply
    kind: str


@dataclass(frozen=True, slots=True)
class MessageComplete:
    """CRLF.CRLF arrived. ``error`` is set when the body was refused (then no chunk was complete)."""

    size: int
    error: Reply | None


@dataclass(frozen=True, slots=True)
class ChunkComplete:
    """All octets of one BDAT chunk were read; ``last``: the message is complete. ``error``: the
    message is refused (bare line ending, NUL, size), answered with it."""

    size: int
    last: bool
    total: int
    error: Reply | None


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed its side; ``in_data`` tells whether a message was cut short."""

    in_data: bool


# Which state a positive answer to each command leads to. A pair missing here is refused.
_ALLOWED: dict[type[Command], frozenset[State]] = {
    Helo: frozenset({State.READY, State.MAIL, State.RCPT}),
    Ehlo: frozenset({State.READY, State.MAIL, State.RCPT}),
    MailFrom: frozenset({State.READY}),
    RcptTo: frozenset({State.MAIL, State.RCPT}),
    Data: frozenset({State.RCPT}),
    Xclient: frozenset({State.READY}),
}

_KIND: dict[Reply, str] = {
    replies.LINE_TOO_LONG: "line_too_long",
    replies.BARE_LF_COMMAND: "bare_lf",
    replies.BAD_CHARACTERS: "bad_characters",
    replies.NON_ASCII_COMMAND: "non_ascii",
    replies.UNKNOWN_COMMAND: "unknown_command",
    replies.NOT_IMPLEMENTED: "not_implemented",
}


class ServerConnection:
    """One client session's protocol state. Not thread-safe; feed it from one place."""

    __slots__ = ("limits", "state", "helo", "esmtp", "rcpt_count", "rcpt_attempts", "errors", "tls",
                 "discarded_after_starttls", "_chunks", "_chunk", "_chunk_refusal", "_chunk_left",
                 "_chunk_done",
                 "_buf", "_eof", "_pending", "_lines", "_data", "_closed_event_sent", "_data_done")

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.state = State.CONNECT
        self.helo: str | None = None
        self.esmtp = False
        self.rcpt_count = 0
        self.rcpt_attempts = 0
        self.errors = 0
        self.tls = False                  # the session is (being switched to) TLS
        self.discarded_after_starttls = 0
        self._chunks: ChunkReader | None = None     # the message being sent in BDAT chunks
        self._chunk: Bdat | None = None             # the chunk whose octets are being read
        self._chunk_refusal: Reply | None = None    # its answer once read, when it is out of sequence
        self._chunk_left = 0
        self._chunk_done = False
        self._buf = bytearray()
        self._eof = False
        self._pending: object | None = Greeting()
        self._lines = LineReader(self.limits.max_command_line_bytes)
        self._data: DataReader | None = None
        self._closed_event_sent = False
        self._data_done = False

    # --- input -------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if data:
            if self.state is State.CLOSED:
                return          # nothing more will be read: holding it would only grow memory
            self._buf += data
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (for flow control)."""
        return len(self._buf)

    @property
    def pending(self) -> object | None:
        """The event awaiting an answer, if any."""
        return self._pending

    def next_event(self) -> object:
        """The next event, or NEED_DATA / PAUSED."""
        if self._pending is not None:
            return PAUSED
        if self.state is State.CLOSED:
            return NEED_DATA
        if self.state is State.DATA:
            return self._next_data_event()
        if self._chunk is not None:
            return self._next_chunk_event()
        line = self._lines.next_line(self._buf)
        if line is None:
            return self._eof_event() if self._eof else NEED_DATA
        if isinstance(line, Reply):
            return self._violation(line)
        parsed = parse_command(line, max_message_bytes=self.limits.max_message_bytes)
        if isinstance(parsed, Reply):
            return self._violation(parsed, kind="syntax")
        return self._sequence(parsed)

    def _next_data_event(self) -> object:
        reader = self._data
        assert reader is not None
        if not self._data_done:
            chunk, self._data_done = reader.read(self._buf)
            if chunk is not None:
                return chunk
        if self._data_done:
            event = MessageComplete(reader.size, reader.error)
            self._data = None
            self._data_done = False
            self._pending = event
            return event
        return self._eof_event() if self._eof else NEED_DATA

    def _next_chunk_event(self) -> object:
        """The octets of a BDAT chunk: consumed whatever the verdict, then answered."""
        cmd = self._chunk
        assert cmd is not None
        if self._chunk_refusal is not None:
            take = min(len(self._buf), self._chunk_left)
            del self._buf[:take]
            self._chunk_left -= take
            if self._chunk_left:
                return self._eof_event() if self._eof else NEED_DATA
            refusal, self._chunk, self._chunk_refusal = self._chunk_refusal, None, None
            return self._violation(refusal, kind="sequence")
        reader = self._chunks
        assert reader is not None
        if not self._chunk_done:
            chunk, self._chunk_done = reader.read(self._buf)
            if chunk is not None:
                return chunk
        if not self._chunk_done:
            return self._eof_event() if self._eof else NEED_DATA
        self._chunk, self._chunk_done = None, False
        event = ChunkComplete(cmd.size, cmd.last, reader.size, reader.error)
        self._pending = event
        return event

    def _start_chunk(self, cmd: Bdat) -> object:
        """A BDAT command: its octets follow on the wire whatever we will answer, so read them first."""
        self._chunk = cmd
        if self.state in (State.RCPT, State.BDAT):
            if self._chunks is None:
                self._chunks = ChunkReader(self.limits.max_message_bytes, self.limits.reject_nul,
                                           self.limits.max_text_line_bytes)
            self._chunks.start(cmd.size, cmd.last)
        else:
            self._chunk_refusal = self._sequence_reply(cmd)
            self._chunk_left = cmd.size
        return self._next_chunk_event()

    def _eof_event(self) -> object:
        if self._closed_event_sent:
            return NEED_DATA
        self._closed_event_sent = True
        in_data = self.state is State.DATA
        self.state = State.CLOSED
        self._data = None
        return ConnectionClosed(in_data)

    def _violation(self, reply: Reply, kind: str | None = None, *, counted: bool = True) -> ProtocolViolation:
        kind = kind or _KIND.get(reply, "sequence")      # what the client did, even if answered 421
        if counted:
            self.errors += 1
            if self.errors >= self.limits.max_errors:
                reply = replies.TOO_MANY_ERRORS
        event = ProtocolViolation(reply, kind)
        self._pending = event
        return event

    def _sequence(self, cmd: Command) -> object:
        """Check the command against the state; return it, or the violation that refuses it."""
        kind = type(cmd)
        if isinstance(cmd, Unknown) or (kind is Xclient and not self.limits.xclient):
            known = kind is Xclient or cmd.known  # type: ignore[attr-defined]
            return self._violation(replies.NOT_IMPLEMENTED if known else replies.UNKNOWN_COMMAND)
        allowed = _ALLOWED.get(kind)
        if allowed is not None and self.state not in allowed:
            return self._violation(self._sequence_reply(cmd), kind="sequence")
        if kind is Bdat:
            if not self.limits.chunking:
                return self._violation(replies.NOT_IMPLEMENTED)
            return self._start_chunk(cmd)  # type: ignore[arg-type]
        if kind is Data and self.state is State.BDAT:
            return self._violation(replies.BDAT_AFTER_DATA, kind="sequence")
        if kind is StartTls:
            if not self.limits.starttls:
                return self._violation(replies.NOT_IMPLEMENTED)
            if self.tls:
                return self._violation(replies.TLS_ALREADY_ACTIVE, kind="sequence")
            if self.state is not State.READY:
                return self._violation(replies.BAD_SEQUENCE, kind="sequence")
        if kind is MailFrom and self.helo is None and self.limits.need_helo:
            return self._violation(replies.NEED_HELO, kind="sequence")
        if kind is RcptTo:
            self.rcpt_attempts += 1
            if self.rcpt_count >= self.limits.max_recipients:
                # Not an error: RFC 5321 4.5.3.1.10 has the client deliver to the accepted recipients
                # and retry the rest, so a long pipelined list must not spend the error budget.
                return self._violation(replies.TOO_MANY_RCPTS, kind="too_many_recipients", counted=False)
        self._pending = cmd
        return cmd

    def _sequence_reply(self, cmd: Command) -> Reply:
        if self.state is State.BDAT:
            return replies.BDAT_AFTER_DATA if isinstance(cmd, (MailFrom, RcptTo, Data)) else replies.BAD_SEQUENCE
        if isinstance(cmd, MailFrom):
            return replies.NESTED_MAIL
        if isinstance(cmd, RcptTo):
            return replies.NEED_MAIL
        if isinstance(cmd, (Data, Bdat)):
            if self.state is State.READY:
                return replies.NEED_MAIL
            return replies.NO_VALID_RCPTS if self.rcpt_attempts else replies.NEED_RCPT
        return replies.BAD_SEQUENCE

    # --- output ------------------------------------------------------------------------------
    def send(self, reply: Reply) -> bytes:
        """Answer the pending event; returns the bytes to write."""
        event = self._pending
        if event is None:
            raise LocalProtocolError(f"no command to answer with {reply}")
        if isinstance(event, Data) and reply.code == 250:
            raise LocalProtocolError("DATA must be answered with 354 or an error")
        self._pending = None
        if reply.code == 421 or isinstance(event, Quit):
            self.state = State.CLOSED
        elif isinstance(event, ProtocolViolation):
            if event.reply is replies.TOO_MANY_ERRORS:
                self.state = State.CLOSED
        else:
            self._advance(event, reply)
        return reply.to_bytes()

    def close(self, reply: Reply) -> bytes:
        """Say goodbye out of turn (timeouts, shutdown): any pending event is dropped."""
        self._pending = None
        self._data = None
        self.state = State.CLOSED
        return reply.to_bytes()

    def _advance(self, event: object, reply: Reply) -> None:
        ok = reply.is_positive
        if isinstance(event, Greeting):
            self.state = State.READY if reply.code == 220 else State.CLOSED
        elif isinstance(event, (Helo, Ehlo)):
            if ok:
                self.helo = event.domain
                self.esmtp = isinstance(event, Ehlo)
                self._reset_transaction()
        elif isinstance(event, MailFrom):
            if ok:
                self.state = State.MAIL
        elif isinstance(event, RcptTo):
            if ok:
                self.state = State.RCPT
                self.rcpt_count += 1
        elif isinstance(event, Data):
            if reply.code == 354:
                self.state = State.DATA
                lim = self.limits
                self._data = DataReader(lim.max_message_bytes, lim.max_text_line_bytes, lim.reject_nul)
        elif isinstance(event, (MessageComplete, Rset)):
            self._reset_transaction()
        elif isinstance(event, ChunkComplete):
            if event.last or event.error is not None or not reply.is_positive:
                self._reset_transaction()      # RFC 3030 4.2: a refused chunk fails the message
            else:
                self.state = State.BDAT
        elif isinstance(event, StartTls):
            if reply.code == 220:
                # RFC 3207 section 4.2: forget everything learned in plaintext. Whatever the client
                # pipelined after STARTTLS came in plaintext too: it is dropped, never executed
                # (CVE-2011-0411); the adapter reads nothing more until the handshake is done.
                self.discarded_after_starttls = len(self._buf)
                self._buf.clear()
                self._lines = LineReader(self.limits.max_command_line_bytes)
                self.tls = True
                self.helo = None
                self.esmtp = False
                self._reset_transaction()
        elif isinstance(event, Xclient):
            if reply.code == 220:
                # XCLIENT_README: the session restarts as if the named client had just connected.
                self.helo = None
                self.esmtp = False
                self._reset_transaction()

    def _reset_transaction(self) -> None:
        self._chunks = None
        self.state = State.READY
        self.rcpt_count = 0
        self.rcpt_attempts = 0

    # --- helpers for adapters ----------------------------------------------------------------
    def next_is_data(self) -> bool:
        """Has the client already pipelined DATA as its next command? (A hint for relaying only.)"""
        return self._buf[:6].upper() == b"DATA\r\n"

    def ehlo_keywords(self) -> list[str]:
        words = ["PIPELINING", f"SIZE {self.limits.max_message_bytes}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.limits.starttls and not self.tls:
            words.append("STARTTLS")
        if self.limits.chunking:
            words.append("CHUNKING")
        if self.limits.xclient:
            words.append("XCLIENT NAME ADDR PORT PROTO HELO")
        return words

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED


def standard_reply(event: object, *, privacy: frozenset[str] = frozenset()) -> Reply | None:
    """The usual answer to commands that need no policy; None for those that do."""
    if isinstance(event, ProtocolViolation):
        return event.reply
    if isinstance(event, (Noop,)):
        return replies.NOOP_OK
    if isinstance(event, Rset):
        return replies.RSET_OK
    if isinstance(event, Quit):
        return replies.BYE
    if isinstance(event, Help):
        return replies.HELP
    if isinstance(event, Vrfy):
        # Never disclose: RFC 5321 3.5.3 allows 252 "cannot verify"; novrfy refuses outright.
        return replies.VRFY_DENIED if "novrfy" in privacy else replies.CANNOT_VRFY
    if isinstance(event, Expn):
        return replies.EXPN_DENIED
    return None
