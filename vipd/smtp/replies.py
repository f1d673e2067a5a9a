"""Every SMTP reply vipd sends, as data: RFC 5321 basic codes with RFC 3463 enhanced status.

Rule: no other module builds a reply from literals; grep ``Reply(`` here to see them all.
Enhanced status codes are left off the greeting, the HELO/EHLO answer and 354, as RFC 2034
section 3 allows, and as Postfix and sendmail do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "Reply",
    "parse_reply_line",
    "greeting",
    "ehlo_reply",
    "helo_reply",
]


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: basic code, enhanced status (or None) and text (may hold newlines)."""

    code: int
    status: str | None
    text: str
    # The wire form, built once: most replies are catalogue constants sent again and again.
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False, hash=False)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        return self.text.split("\n") if self.text else [""]

    def to_bytes(self) -> bytes:
        """Wire form; multi-line text becomes ``250-`` continuation lines."""
        wire = self._wire
        if wire is None:
            wire = self._build()
            object.__setattr__(self, "_wire", wire)
        return wire

    def _build(self) -> bytes:
        parts = self.lines()
        prefix = f"{self.status} " if self.status else ""
        out = []
        last = len(parts) - 1
        for i, line in enumerate(parts):
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{prefix}{line}".rstrip() + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        prefix = f" {self.status}" if self.status else ""
        return f"{self.code}{prefix} {' / '.join(self.lines())}"

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.status, text)


def parse_reply_line(line: bytes) -> tuple[int, bool, str] | None:
    """Split one reply line into (code, is_last, text); None if it is not a reply line."""
    if len(line) < 3 or not line[:3].isdigit():
        return None
    code = int(line[:3])
    if code < 200 or code > 599:
        return None
    sep = line[3:4]
    if sep not in (b" ", b"-", b""):
        return None
    return code, sep != b"-", line[4:].decode("utf-8", "replace")


def greeting(banner: str) -> Reply:
    return Reply(220, None, banner)


def helo_reply(hostname: str) -> Reply:
    return Reply(250, None, hostname)


def ehlo_reply(hostname: str, keywords: list[str]) -> Reply:
    return Reply(250, None, "\n".join([hostname, *keywords]))


# --- 2xx ------------------------------------------------------------------------------------
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
RSET_OK = Reply(250, "2.0.0", "Ok")
NOOP_OK = Reply(250, "2.0.0", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
HELP = Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY EXPN")
CANNOT_VRFY = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")

# --- 4xx ------------------------------------------------------------------------------------
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
TOO_MANY_SESSIONS = Reply(421, "4.3.2", "Too many connections, try again later")
COMMAND_TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for command, closing connection")
DATA_TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for data, closing connection")
SESSION_TIMEOUT = Reply(421, "4.4.2", "Session too long, closing connection")
DATA_TOO_SLOW = Reply(421, "4.4.2", "Data rate too low, closing connection")
TOO_MANY_MESSAGES = Reply(421, "4.7.0", "Too many messages in this session, closing connection")
INTERNAL = Reply(421, "4.3.0", "Internal error, closing connection")
NO_BACKEND = Reply(451, "4.4.1", "No backend available, try again later")
BACKEND_FAILED = Reply(451, "4.4.2", "Backend connection lost, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing")
SPOOL_FAILED = Reply(452, "4.3.1", "Insufficient system storage, try again later")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")

# --- 5xx: the client broke the protocol -----------------------------------------------------
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_LF_COMMAND = Reply(500, "5.5.2", "Command line must end with CRLF")
BAD_CHARACTERS = Reply(500, "5.5.2", "Command contains NUL or bare CR")
NON_ASCII_COMMAND = Reply(500, "5.5.2", "Command contains non-ASCII bytes")
SYNTAX = Reply(501, "5.5.2", "Syntax error in parameters or arguments")
HELO_SYNTAX = Reply(501, "5.5.2", "Syntax: HELO/EHLO hostname")
MAIL_SYNTAX = Reply(501, "5.5.2", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.2", "Syntax: RCPT TO:<address>")
BAD_SENDER_ADDRESS = Reply(553, "5.1.7", "Bad sender address syntax")
BAD_RCPT_ADDRESS = Reply(553, "5.1.3", "Bad recipient address syntax")
NO_ARGUMENTS = Reply(501, "5.5.4", "No parameters allowed")
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
BAD_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
BDAT_AFTER_DATA = Reply(503, "5.5.1", "BDAT and DATA cannot be mixed in one transaction")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available due to temporary reason")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
EXPN_DENIED = Reply(502, "5.7.0", "EXPN not allowed")
VRFY_DENIED = Reply(502, "5.5.1", "VRFY command is disabled")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT (recipient)")
NO_VALID_RCPTS = Reply(554, "5.5.1", "No valid recipients")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
DATA_LINE_TOO_LONG = Reply(550, "5.6.0", "Message has a line longer than the limit")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Message contains bare CR or LF; lines must end with CRLF")
NUL_IN_DATA = Reply(550, "5.6.0", "Message contains NUL bytes")
BAD_EIGHTBIT = Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
# sendmail DISCARD: the client is told the message was accepted; it is thrown away.
DISCARDED = Reply(250, "2.0.0", "Ok")
