"""The client side of SMTP as a pure reader of replies, plus the command lines vipd sends to backends.

Rules: replies come back in the order commands went out (RFC 2920); the caller keeps that queue.
A hostile or broken server cannot make this code hold unbounded memory: a reply line longer than
``MAX_REPLY_LINE`` or a reply of more than ``MAX_REPLY_LINES`` lines is a ``RemoteProtocolError``.
We chose our own sans-IO reader over aiosmtplib for backend sessions because the relay pipelines
MAIL/RCPT/DATA on pooled connections and streams the body unchanged; aiosmtplib's stream-based
client re-encodes the body and waits for each reply, which costs several times the CPU per message.
"""

from __future__ import annotations

import re

from .commands import Address
from .replies import Reply, parse_reply_line

__all__ = [
    "ReplyReader",
    "RemoteProtocolError",
    "parse_ehlo",
    "split_status",
    "mail_command",
    "rcpt_command",
    "xclient_command",
]

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100

_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


class RemoteProtocolError(Exception):
    """The server sent something that is not SMTP."""


class ReplyReader:
    """Turns bytes from a server into complete ``Reply`` values."""

    __slots__ = ("_buf", "_lines", "_code")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code = 0

    def feed(self, data: bytes) -> list[Reply]:
        """Add bytes; return every reply they complete, in order."""
        self._buf += data
        out: list[Reply] = []
        while True:
            nl = self._buf.find(b"\n")
            # The limit is on the line (without its CRLF), however the bytes were cut.
            end = nl if nl >= 0 else len(self._buf)
            if end - (1 if end and self._buf[end - 1] == 0x0D else 0) > MAX_REPLY_LINE:
                raise RemoteProtocolError("reply line too long")
            if nl < 0:
                return out
            raw = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            reply = self._line(raw)
            if reply is not None:
                out.append(reply)

    def _line(self, raw: bytes) -> Reply | None:
        parsed = parse_reply_line(raw)
        if parsed is None:
            raise RemoteProtocolError(f"not an SMTP reply: {raw[:80]!r}")
        code, last, text = parsed
        if self._lines and code != self._code:
            raise RemoteProtocolError("reply code changed within a multi-line reply")
        self._code = code
        self._lines.append(text)
        if len(self._lines) > MAX_REPLY_LINES:
            raise RemoteProtocolError("reply has too many lines")
        if not last:
            return None
        lines, self._lines = self._lines, []
        return split_status(code, lines)


def split_status(code: int, lines: list[str]) -> Reply:
    """Build a Reply, lifting an RFC 3463 status off the first line when its class matches."""
    match = _STATUS.match(lines[0])
    status = None
    if match and match.group(1) == str(code)[0]:
        status = f"{match.group(1)}.{match.group(2)}.{match.group(3)}"
        lines = [_without_status(line, status) for line in lines]
    return Reply(code, status, "\n".join(lines))


def _without_status(line: str, status: str) -> str:
    """Drop ``status`` from the start of a line; a line starting with another status keeps it."""
    match = _STATUS.match(line)
    return line[match.end():] if match and match.group(0).rstrip(" ") == status else line


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters; the first line is the server's name."""
    out: dict[str, str] = {}
    for line in reply.lines()[1:]:
        key, _, value = line.strip().partition(" ")
        if key:
            out[key.upper()] = value
    return out


def mail_command(sender: Address, *, size: int | None = None, body: str | None = None) -> bytes:
    params = ""
    if size is not None:
        params += f" SIZE={size}"
    if body is not None:
        params += f" BODY={body}"
    return f"MAIL FROM:<{sender.text}>{params}\r\n".encode("ascii")


def rcpt_command(rcpt: Address) -> bytes:
    return f"RCPT TO:<{rcpt.text}>\r\n".encode("ascii")


def _xtext(value: str) -> str:
    """RFC 1891 xtext, as Postfix's XCLIENT_README asks for attribute values."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in value)


def xforward_command(attrs: dict[str, str]) -> bytes:
    """``XFORWARD NAME=... ADDR=...`` (Postfix's XFORWARD_README): the client of the next transaction."""
    parts = " ".join(f"{k}={_xtext(v)}" for k, v in attrs.items())
    return f"XFORWARD {parts}\r\n".encode("ascii")


def xclient_command(attrs: dict[str, str]) -> bytes:
    """``XCLIENT NAME=... ADDR=...``; unknown values are sent as ``[UNAVAILABLE]``."""
    parts = " ".join(f"{k}={_xtext(v)}" for k, v in attrs.items())
    return f"XCLIENT {parts}\r\n".encode("ascii")
