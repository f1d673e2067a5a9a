"""Parse one SMTP command line (CRLF already stripped) into a command value, or a reply saying why not.

Rules: pure functions, no state. Addresses follow RFC 5321 section 4.1.2 (Mailbox, Path, source routes
that are accepted and dropped as section C of the RFC says); mail parameters follow RFC 1870 (SIZE) and
RFC 6152 (BODY). Anything we do not advertise is refused with 555, never silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import replies
from .replies import Reply

__all__ = [
    "Address",
    "NULL_PATH",
    "Command",
    "Helo",
    "Ehlo",
    "MailFrom",
    "RcptTo",
    "Data",
    "Rset",
    "Noop",
    "Quit",
    "Help",
    "Vrfy",
    "Expn",
    "Unknown",
    "Xclient",
    "StartTls",
    "Bdat",
    "parse_command",
    "parse_path",
]


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox as the client wrote it; ``domain`` is lower-cased, '' for ``<>`` and ``<postmaster>``."""

    local: str
    domain: str
    text: str           # local@domain as given (quoted local part kept quoted), '' for the null path
    had_route: bool = False

    @property
    def is_null(self) -> bool:
        return self.text == ""

    def __str__(self) -> str:
        return f"<{self.text}>"


NULL_PATH = Address("", "", "")


@dataclass(frozen=True, slots=True)
class Command:
    """Base of every parsed command."""


@dataclass(frozen=True, slots=True)
class Helo(Command):
    domain: str


@dataclass(frozen=True, slots=True)
class Ehlo(Command):
    domain: str


@dataclass(frozen=True, slots=True)
class MailFrom(Command):
    address: Address
    params: tuple[tuple[str, str | None], ...] = ()
    size: int | None = None
    body: str | None = None


@dataclass(frozen=True, slots=True)
class RcptTo(Command):
    address: Address
    params: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True, slots=True)
class Data(Command):
    pass


@dataclass(frozen=True, slots=True)
class Rset(Command):
    pass


@dataclass(frozen=True, slots=True)
class Noop(Command):
    pass


@dataclass(frozen=True, slots=True)
class Quit(Command):
    pass


@dataclass(frozen=True, slots=True)
class Help(Command):
    argument: str = ""


@dataclass(frozen=True, slots=True)
class Vrfy(Command):
    argument: str = ""


@dataclass(frozen=True, slots=True)
class Expn(Command):
    argument: str = ""


@dataclass(frozen=True, slots=True)
class Xclient(Command):
    """Postfix's XCLIENT: a trusted proxy names the real client (attributes upper-cased, xtext decoded)."""

    attrs: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        return dict(self.attrs).get(key)


@dataclass(frozen=True, slots=True)
class Bdat(Command):
    """RFC 3030: ``size`` octets of message follow the command line; ``last`` ends the message."""

    size: int
    last: bool


@dataclass(frozen=True, slots=True)
class StartTls(Command):
    """RFC 3207: the client asks to turn the session into TLS."""


@dataclass(frozen=True, slots=True)
class Unknown(Command):
    verb: str
    known: bool = field(default=False)   # a real SMTP verb we do not offer (STARTTLS, AUTH, BDAT...)


# Verbs that exist in SMTP extensions we do not offer yet: answered 502, not 500.
_UNOFFERED = frozenset({"AUTH", "ETRN", "TURN", "ATRN", "XFORWARD",
                        "SEND", "SOML", "SAML", "VERB"})

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_LITERAL = re.compile(r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+|[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+)\]")
_ROUTE = re.compile(rf"@(?:{_LABEL}(?:\.{_LABEL})*|\[[^\]]*\])(?:,@(?:{_LABEL}(?:\.{_LABEL})*|\[[^\]]*\]))*:")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def parse_path(text: str, *, allow_null: bool, allow_postmaster: bool) -> Address | None:
    """Parse ``<...>`` (brackets optional when the path has no spaces); None when invalid."""
    if text.startswith("<"):
        if not text.endswith(">"):
            return None
        inner = text[1:-1]
    elif not text:
        return None           # "MAIL FROM:" with nothing: the null path must be written <>
    else:
        inner = text
    if inner == "":
        return NULL_PATH if allow_null else None
    had_route = False
    route = _ROUTE.match(inner)
    if route:
        had_route = True
        inner = inner[route.end():]
    if allow_postmaster and inner.lower() == "postmaster":
        return Address(inner, "", inner, had_route)
    local, at, domain = inner.rpartition("@")
    if not at or not local or not domain:
        return None
    if not (_DOT_ATOM.fullmatch(local) or _QUOTED.fullmatch(local)):
        return None
    if not (_DOMAIN.fullmatch(domain) or _LITERAL.fullmatch(domain)) or len(domain) > 255:
        return None
    return Address(local, domain.lower().rstrip("."), f"{local}@{domain}", had_route)


def _split_path_and_params(rest: str) -> tuple[str, str]:
    """Separate ``<path>`` from ESMTP parameters; tolerates a space after the colon."""
    rest = rest.lstrip(" ")
    if rest.startswith("<"):
        # A quoted local part may hold '>' or spaces: find the closing bracket outside quotes.
        in_quote = escaped = False
        for i, ch in enumerate(rest):
            if escaped:
                escaped = False
            elif ch == "\\" and in_quote:
                escaped = True
            elif ch == '"':
                in_quote = not in_quote
            elif ch == ">" and not in_quote:
                return rest[: i + 1], rest[i + 1:]
        return rest, ""
    path, _, params = rest.partition(" ")
    return path, " " + params if params else ""


def _parse_params(text: str) -> tuple[tuple[str, str | None], ...] | None:
    if text and not text.startswith(" "):
        return None
    out = []
    for word in text.split():
        key, eq, value = word.partition("=")
        if not _PARAM_KEY.fullmatch(key) or (eq and not value):
            return None
        out.append((key.upper(), value if eq else None))
    return tuple(out)


def _parse_mail(rest: str, max_size: int) -> Command | Reply:
    path, params_text = _split_path_and_params(rest)
    address = parse_path(path, allow_null=True, allow_postmaster=False)
    if address is None:
        return replies.BAD_SENDER_ADDRESS if path.startswith("<") else replies.MAIL_SYNTAX
    params = _parse_params(params_text)
    if params is None:
        return replies.SYNTAX
    size = body = None
    for key, value in params:
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                return replies.SYNTAX
            size = int(value)
            if size > max_size:
                return replies.TOO_BIG
        elif key == "BODY":
            body = (value or "").upper()
            if body not in ("7BIT", "8BITMIME"):
                return replies.BAD_EIGHTBIT
        else:
            return replies.BAD_PARAMETER
    return MailFrom(address, params, size, body)


def _parse_rcpt(rest: str) -> Command | Reply:
    path, params_text = _split_path_and_params(rest)
    address = parse_path(path, allow_null=False, allow_postmaster=True)
    if address is None:
        return replies.BAD_RCPT_ADDRESS if path.startswith("<") else replies.RCPT_SYNTAX
    params = _parse_params(params_text)
    if params is None:
        return replies.SYNTAX
    if params:
        return replies.BAD_PARAMETER
    return RcptTo(address, params)


def _split_prefix(line: str, prefix: str) -> str | None:
    """Return what follows ``FROM:``/``TO:`` (case-insensitive), or None."""
    if line[: len(prefix)].upper() != prefix:
        return None
    return line[len(prefix):]


def parse_command(line: bytes, *, max_message_bytes: int) -> Command | Reply:
    """Parse one command line without its CRLF. Never raises on any input."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return replies.NON_ASCII_COMMAND
    if _CONTROL.search(text):
        return replies.BAD_CHARACTERS
    verb, _, rest = text.partition(" ")
    verb = verb.upper()
    rest_stripped = rest.strip(" \t")
    if verb in ("HELO", "EHLO"):
        if not rest_stripped or " " in rest_stripped:
            return replies.HELO_SYNTAX
        return Helo(rest_stripped) if verb == "HELO" else Ehlo(rest_stripped)
    if verb == "MAIL":
        tail = _split_prefix(rest, "FROM:")
        return replies.MAIL_SYNTAX if tail is None else _parse_mail(tail, max_message_bytes)
    if verb == "RCPT":
        tail = _split_prefix(rest, "TO:")
        return replies.RCPT_SYNTAX if tail is None else _parse_rcpt(tail)
    simple = _SIMPLE.get(verb)
    if simple is not None:
        return simple() if not rest_stripped else replies.NO_ARGUMENTS
    if verb == "NOOP":
        return Noop()          # RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored
    if verb in ("HELP", "VRFY", "EXPN"):
        cls = {"HELP": Help, "VRFY": Vrfy, "EXPN": Expn}[verb]
        if verb != "HELP" and not rest_stripped:
            return replies.SYNTAX
        return cls(rest_stripped)
    if verb == "XCLIENT":
        return _parse_xclient(rest_stripped)
    if verb == "BDAT":
        words = rest_stripped.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > 15 or (
                len(words) == 2 and words[1].upper() != "LAST"):
            return replies.BDAT_SYNTAX
        return Bdat(int(words[0]), len(words) == 2)
    return Unknown(verb[:32], known=verb in _UNOFFERED)


_XTEXT = re.compile(r"\+([0-9A-F]{2})")


def _parse_xclient(rest: str) -> Command | Reply:
    attrs = []
    for word in rest.split():
        key, eq, value = word.partition("=")
        if not eq or not _PARAM_KEY.fullmatch(key):
            return replies.SYNTAX
        attrs.append((key.upper(), _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), value)))
    if not attrs:
        return replies.SYNTAX
    return Xclient(tuple(attrs))


_SIMPLE: dict[str, type[Command]] = {"DATA": Data, "RSET": Rset, "QUIT": Quit, "STARTTLS": StartTls}
