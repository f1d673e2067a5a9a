"""An asyncio client for SpamAssassin's spamd (the SPAMC/1.5 protocol): score a message, and PING it.

The protocol (spamd's PROTOCOL file): one request per connection. The request is a line
``SYMBOLS SPAMC/1.5``, headers (``Content-length``, optionally ``User``), an empty line and the
message; spamd answers ``SPAMD/1.1 0 EX_OK``, headers with ``Spam: True ; 1003.3 / 5.0`` (the
verdict, the score and the threshold), an empty line, and for SYMBOLS the names of the rules that
hit, comma-separated. A non-zero code is an error named after sysexits.h (``EX_PROTOCOL``...).
``PING`` is answered ``SPAMD/1.5 0 PONG``.

Rules:
- ``timeout`` covers the whole call, as a deadline rather than per read: a spamd that trickles its
  reply must not hold a mail transaction longer than that.
- A reply is at most ``_MAX_REPLY_BYTES``: SYMBOLS answers are short, and a peer that is not spamd
  must not fill our memory.
- Errors: ``SpamdError`` and its subclasses (which are also the matching stdlib exceptions):

      SpamdError (vipd.errors.BackendError)
      ├── SpamdUnavailable     (also ConnectionError: cannot connect, reset, closed without a reply)
      ├── SpamdTimeout         (also TimeoutError: no whole reply within ``timeout``)
      └── SpamdProtocolError   (a reply that is not spamd's, or spamd's own error code)

  ``spamd_ping`` returns False on all of these instead: it answers "is spamd up?".
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from vipd.errors import BackendError

__all__ = ["DEFAULT_PORT", "SpamResult", "SpamdError", "SpamdProtocolError", "SpamdTimeout", "SpamdUnavailable",
           "parse_spamd_reply", "spamd_check", "spamd_ping"]

DEFAULT_PORT = 783
_MAX_REPLY_BYTES = 65536
_STATUS = re.compile(rb"SPAMD/(\d+\.\d+) +(\d+) +(.*)")
_SPAM = re.compile(r"(True|False|Yes|No) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)", re.IGNORECASE)


class SpamdError(BackendError):
    """Talking to spamd failed; the message was not scored."""


class SpamdUnavailable(SpamdError, ConnectionError):
    pass


class SpamdTimeout(SpamdError, TimeoutError):
    pass


class SpamdProtocolError(SpamdError):
    pass


@dataclass(frozen=True, slots=True)
class SpamResult:
    spam: bool
    score: float
    threshold: float
    rules: tuple[str, ...] = ()


async def spamd_check(message: bytes, *, unix_path: str | None = None, host: str | None = None,
                      port: int | None = None, user: str | None = None, timeout: float = 30.0) -> SpamResult:
    """Score ``message`` with SYMBOLS; raises SpamdError (see the module docstring) when it is not scored."""
    head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(message)}\r\n"
    if user is not None:
        if not user or any(c in user for c in "\r\n"):
            raise ValueError(f"bad spamd user name {user!r}")
        head += f"User: {user}\r\n"
    reply = await _call(head.encode() + b"\r\n", message, unix_path, host, port, timeout)
    return parse_spamd_reply(reply)


async def spamd_ping(*, unix_path: str | None = None, host: str | None = None, port: int | None = None,
                     timeout: float = 5.0) -> bool:
    """True when spamd answers PING with PONG; False when it cannot be reached or answers anything else."""
    try:
        reply = await _call(b"PING SPAMC/1.5\r\n\r\n", b"", unix_path, host, port, timeout)
    except SpamdError:
        return False
    status = _STATUS.fullmatch(reply.partition(b"\r\n")[0].rstrip(b"\r\n"))
    return status is not None and status.group(2) == b"0" and status.group(3).strip() == b"PONG"


def parse_spamd_reply(reply: bytes) -> SpamResult:
    """A SYMBOLS (or CHECK) reply as a result; spamd's error codes and anything unknown raise."""
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        raise SpamdProtocolError(f"spamd reply without an end of headers: {reply[:200]!r}")
    lines = head.split(b"\r\n")
    status = _STATUS.fullmatch(lines[0])
    if status is None:
        raise SpamdProtocolError(f"not a spamd reply: {lines[0][:200]!r}")
    if status.group(2) != b"0":
        raise SpamdProtocolError(f"spamd error {int(status.group(2))}: "
                                 f"{status.group(3).decode('ascii', 'replace')[:200]}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            raise SpamdProtocolError(f"bad spamd header line {line[:200]!r}")
        headers[name.strip().lower()] = value.strip()
    verdict = _SPAM.fullmatch(headers.get("spam", ""))
    if verdict is None:
        raise SpamdProtocolError(f"spamd reply without a Spam: header: {head[:200]!r}")
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) != len(body)):
        raise SpamdProtocolError(f"spamd reply body is {len(body)} bytes, Content-length says {length}")
    rules = tuple(r.strip() for r in body.decode("ascii", "replace").split(",") if r.strip())
    return SpamResult(verdict.group(1).lower() in ("true", "yes"), float(verdict.group(2)),
                      float(verdict.group(3)), rules)


async def _call(head: bytes, body: bytes, unix_path: str | None, host: str | None, port: int | None,
                timeout: float) -> bytes:
    if (unix_path is None) == (host is None):
        raise ValueError("give either unix_path or host (with port), not both or neither")
    where = unix_path if unix_path is not None else f"{host}:{port or DEFAULT_PORT}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                if unix_path is not None:
                    reader, writer = await asyncio.open_unix_connection(unix_path)
                else:
                    reader, writer = await asyncio.open_connection(host, port or DEFAULT_PORT)
            except OSError as exc:
                raise SpamdUnavailable(f"spamd at {where}: cannot connect: {exc}") from exc
            try:
                writer.write(head)
                if body:
                    writer.write(body)
                await writer.drain()
                # spamd reads Content-length bytes; the half-close also tells a confused peer we are done.
                if writer.can_write_eof():
                    writer.write_eof()
                reply = await reader.read(_MAX_REPLY_BYTES + 1)
                while reply and len(reply) <= _MAX_REPLY_BYTES:
                    more = await reader.read(_MAX_REPLY_BYTES + 1 - len(reply))
                    if not more:
                        break
                    reply += more
            except OSError as exc:
                raise SpamdUnavailable(f"spamd at {where}: {exc}") from exc
    except TimeoutError as exc:
        raise SpamdTimeout(f"spamd at {where}: no reply within {timeout} s") from exc
    finally:
        if writer is not None:
            writer.close()
    if not reply:
        raise SpamdUnavailable(f"spamd at {where}: closed without a reply")
    if len(reply) > _MAX_REPLY_BYTES:
        raise SpamdProtocolError(f"spamd at {where}: reply longer than {_MAX_REPLY_BYTES} bytes")
    return reply
