"""Active checks of one backend: an SMTP dialogue (HAProxy ``option smtpchk``) and an agent-check read.

``smtp_check`` connects, reads the whole greeting, sends EHLO, reads the reply, sends QUIT and
closes; only a 2xx greeting and a 2xx EHLO reply (listing ``require`` when it is given) are healthy.
It never raises for a sick server: every failure is a ``CheckResult`` with ``ok=False``.

``agent_check`` reads one line of HAProxy's agent-check text protocol; ``parse_agent_reply`` is
the pure parser. Not the hot path, so plain asyncio streams.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

__all__ = ["AGENT_ADMIN", "AGENT_OPERATIONAL", "AGENT_STATES", "AgentReport", "CheckResult", "agent_check",
           "parse_agent_reply", "smtp_check"]

MAX_REPLY_LINES = 100
QUIT_WAIT_SECONDS = 1.0     # a server that never answers QUIT must not turn a verdict into a timeout
MAX_AGENT_LINE = 4096
AGENT_ADMIN = frozenset({"ready", "drain", "maint"})              # what the operator could say
AGENT_OPERATIONAL = frozenset({"up", "down", "fail", "stopped"})  # whether the server works
AGENT_STATES = AGENT_ADMIN | AGENT_OPERATIONAL
_WEIGHT = re.compile(r"(\d{1,9})%")
_SEPARATORS = re.compile(r"[ \t,]+")


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class AgentReport:
    """``state``: the last state word of the line (lower case), ``weight_percent``: the last ``N%``;
    ``admin`` and ``operational``: the last word of each kind, which HAProxy keeps apart (a line may
    say ``drain up``: in service, but take nothing new)."""

    state: str | None
    weight_percent: int | None
    raw: str
    admin: str | None = None
    operational: str | None = None


class CheckFailed(Exception):
    """A reason the server is not healthy, carried up to ``smtp_check``."""


# --- SMTP -----------------------------------------------------------------------------------------

async def smtp_check(host: str, port: int, *, helo: str = "health.vipd.test", timeout: float = 5.0,
                     require: str | None = None, preamble: bytes = b"") -> CheckResult:
    """One ``option smtpchk``-style check; ``timeout`` bounds the whole dialogue. ``preamble``: what
    the server expects before anything else on a connection (a PROXY header), as transactions send."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            detail = await _smtp_dialogue(host, port, helo, require, preamble)
    except CheckFailed as exc:
        return CheckResult(False, str(exc), time.monotonic() - started)
    except TimeoutError:
        return CheckResult(False, f"timeout after {timeout:g}s", time.monotonic() - started)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        return CheckResult(False, f"{type(exc).__name__}: {exc}", time.monotonic() - started)
    return CheckResult(True, detail, time.monotonic() - started)


async def _smtp_dialogue(host: str, port: int, helo: str, require: str | None, preamble: bytes) -> str:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if preamble:
            writer.write(preamble)
        code, lines = await read_reply(reader)
        if not _is_2xx(code):
            raise CheckFailed(f"greeting {_summary(lines)}")
        writer.write(f"EHLO {helo}\r\n".encode("ascii"))
        await writer.drain()
        code, lines = await read_reply(reader)
        if not _is_2xx(code):
            await _quit(reader, writer)
            raise CheckFailed(f"EHLO {_summary(lines)}")
        if require is not None and require.upper() not in ehlo_keywords(lines):
            await _quit(reader, writer)
            raise CheckFailed(f"EHLO does not list {require.upper()}")
        await _quit(reader, writer)
        return f"EHLO {code}"
    finally:
        writer.close()
        await _closed(writer)


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, list[str]]:
    """Read one (possibly multi-line) SMTP reply; return its code and its lines without CRLF."""
    lines: list[str] = []
    while len(lines) < MAX_REPLY_LINES:
        raw = await reader.readline()
        if not raw.endswith(b"\n"):
            raise CheckFailed(f"connection closed after {len(lines)} reply lines")
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
            raise CheckFailed(f"malformed reply line {line[:80]!r}")
        lines.append(line)
        if line[3:4] != "-":
            return int(line[:3]), lines
    raise CheckFailed(f"reply longer than {MAX_REPLY_LINES} lines")


def ehlo_keywords(lines: list[str]) -> set[str]:
    """The extension keywords an EHLO reply lists (upper case; the first line is the greeting)."""
    return {line[4:].split(" ", 1)[0].upper() for line in lines[1:] if line[4:]}


async def _quit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Say QUIT and read the answer briefly, ignoring errors: the verdict is already made."""
    try:
        async with asyncio.timeout(QUIT_WAIT_SECONDS):
            writer.write(b"QUIT\r\n")
            await writer.drain()
            await read_reply(reader)
    except (OSError, CheckFailed, ValueError, asyncio.IncompleteReadError):
        pass


async def _closed(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.wait_closed()
    except OSError:
        pass


def _is_2xx(code: int) -> bool:
    return 200 <= code <= 299


def _summary(lines: list[str]) -> str:
    return lines[-1][:120] if lines else ""


# --- agent-check ----------------------------------------------------------------------------------

async def agent_check(host: str, port: int, timeout: float = 2.0) -> AgentReport:
    """Read one line from an agent (up to EOF or newline). Raises OSError (TimeoutError included)
    when the agent cannot be reached or does not answer in time: HAProxy treats that as no opinion."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            data = await _read_line(reader)
        finally:
            writer.close()
            await _closed(writer)
    return parse_agent_reply(data.decode("utf-8", "replace"))


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < MAX_AGENT_LINE:
        chunk = await reader.read(MAX_AGENT_LINE - len(data))
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def parse_agent_reply(text: str) -> AgentReport:
    """Parse one agent line: words separated by spaces, tabs or commas; ``#`` starts a comment.

    State words are ``up``, ``down``, ``fail``, ``stopped``, ``ready``, ``drain``, ``maint`` (case
    insensitive; the last one wins); ``N%`` is a weight. Other words (``maxconn:30``...) are ignored.
    """
    raw = text.split("\n", 1)[0].rstrip("\r")
    state = admin = operational = None
    weight: int | None = None
    for word in _SEPARATORS.split(raw.split("#", 1)[0]):
        word = word.lower()
        if word in AGENT_ADMIN:
            state = admin = word
        elif word in AGENT_OPERATIONAL:
            state = operational = word
        elif match := _WEIGHT.fullmatch(word):
            weight = int(match.group(1))
    return AgentReport(state, weight, raw, admin, operational)
