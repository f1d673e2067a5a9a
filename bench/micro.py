"""Micro-benchmark of vipd's protocol core alone: ``vipd.smtp.server.ServerConnection``, no sockets.

Three figures, each the median (with min and max) of ``repeats`` timed loops of ``seconds`` each:
- ``commands_per_s``: pipelined MAIL, RCPT, RSET fed 300 commands at a time, every one answered;
- ``data_mb_per_s``: 100 KiB bodies (78-character lines, as smtp-source sends) fed in 64 KiB reads,
  MAIL, RCPT and DATA included, in 10^6 bytes of body per second;
- ``messages_per_s``: whole 1 KiB transactions (MAIL, RCPT, DATA, body, dot) per second.

Rules: plain ``time.perf_counter`` loops; the adapter's part is kept to the minimum a real one does
(answer each command event, pass body chunks over), so the figures are the core's own cost.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

from vipd.smtp import replies
from vipd.smtp.commands import Data, Ehlo, MailFrom, RcptTo
from vipd.smtp.server import (BodyChunk, MessageComplete, ProtocolViolation, Sentinel, ServerConnection,
                              standard_reply)

from .loads import HELO, RECIPIENT, SENDER
from .stats import Spread

__all__ = ["MicroResult", "run_micro"]

READ_BYTES = 64 * 1024
_ENVELOPE = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\n".encode()
_ANSWERS = {MailFrom: replies.SENDER_OK, RcptTo: replies.RCPT_OK, Data: replies.START_DATA,
            MessageComplete: replies.OK, Ehlo: replies.ehlo_reply("vipd.bench.test", [])}


@dataclass(frozen=True)
class MicroResult:
    commands_per_s: Spread
    data_mb_per_s: Spread
    messages_per_s: Spread

    def to_json(self) -> dict:
        return asdict(self)


def _body(size: int) -> bytes:
    line = b"X" * 78 + b"\r\n"
    return line * (size // len(line) + 1) + b".\r\n"


def _session() -> ServerConnection:
    conn = ServerConnection()
    conn.send(replies.greeting("vipd.bench.test ESMTP"))     # the Greeting event is pending from the start
    conn.receive_data(f"EHLO {HELO}\r\n".encode())
    _drain(conn)
    return conn


def _drain(conn: ServerConnection) -> tuple[int, int]:
    """Answer every event the buffered input yields: (commands answered, body bytes passed over)."""
    answered = body = 0
    while not isinstance(event := conn.next_event(), Sentinel):
        if isinstance(event, BodyChunk):
            body += len(event.data)
            continue
        if isinstance(event, ProtocolViolation) or getattr(event, "error", None) is not None:
            raise RuntimeError(f"micro-benchmark input refused: {event!r}")
        reply = _ANSWERS.get(type(event)) or standard_reply(event)
        assert reply is not None, event
        conn.send(reply)
        answered += 1
    return answered, body


def _commands(conn: ServerConnection) -> Callable[[], int]:
    block = (_ENVELOPE + b"RSET\r\n") * 100

    def step() -> int:
        conn.receive_data(block)
        return _drain(conn)[0]
    return step


def _messages(conn: ServerConnection, size: int, count: str) -> Callable[[], int]:
    """A step sends one message; it returns 1 (``count="messages"``) or the body bytes passed over."""
    wire = _ENVELOPE + b"DATA\r\n" + _body(size)
    reads = [wire[i:i + READ_BYTES] for i in range(0, len(wire), READ_BYTES)]

    def step() -> int:
        passed = 0
        for read in reads:
            conn.receive_data(read)
            passed += _drain(conn)[1]
        return 1 if count == "messages" else passed
    return step


def _rate(step: Callable[[], int], seconds: float) -> float:
    """Units per second of ``step`` (which returns how many units it did) over about ``seconds``."""
    done, start = 0, time.perf_counter()
    deadline = start + seconds
    while (now := time.perf_counter()) < deadline:
        done += step()
    return done / (now - start)


def _spread(make: Callable[[], Callable[[], int]], seconds: float, repeats: int, scale: float = 1.0) -> Spread:
    rates = [_rate(make(), seconds) * scale for _ in range(repeats)]
    spread = Spread.of(rates)
    assert spread is not None
    return spread


def run_micro(seconds: float = 1.0, repeats: int = 3) -> MicroResult:
    """Time the three loops; ``seconds`` per loop, ``repeats`` loops per figure."""
    return MicroResult(
        commands_per_s=_spread(lambda: _commands(_session()), seconds, repeats),
        data_mb_per_s=_spread(lambda: _messages(_session(), 100 * 1024, "bytes"), seconds, repeats, scale=1e-6),
        messages_per_s=_spread(lambda: _messages(_session(), 1024, "messages"), seconds, repeats),
    )
