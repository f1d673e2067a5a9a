"""The content layer's spam step: a scorer (spamd, or an operator's hook) and what a score does to a message.

A scorer is any ``async (message: bytes) -> SpamResult`` (a plain function returning one works too);
``spamd_scorer`` makes one that asks spamd, ``load_hook("package.module:function")`` loads an
operator's own. ``tag`` writes the verdict into the header the way SpamAssassin does
(``X-Spam-Flag``, ``X-Spam-Score``, ``X-Spam-Status``), after removing any such header the message
already carried: a sender must not be able to pre-label its own mail as clean for the filters
behind us.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Union

from .smtpd import parse_service
from .spamd import SpamResult, spamd_check

__all__ = ["SPAM_HEADERS", "Scorer", "SpamResult", "load_hook", "score_with", "spamd_scorer", "status_line", "tag"]

Scorer = Callable[[bytes], Union[Awaitable[SpamResult], SpamResult]]
SPAM_HEADERS = (b"x-spam-flag", b"x-spam-score", b"x-spam-status", b"x-spam-level")


def spamd_scorer(address: str, *, timeout: float = 30.0, user: str | None = None) -> Scorer:
    """A scorer that asks the spamd at ``unix:/path`` or ``HOST:PORT``."""
    where = parse_service(address, "spamd address")

    async def score(message: bytes) -> SpamResult:
        return await spamd_check(message, timeout=timeout, user=user, **where)

    return score


def load_hook(spec: str) -> Scorer:
    """``package.module:function`` as a scorer; ValueError naming what is wrong."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name.isidentifier():
        raise ValueError(f"spam hook {spec!r}: give it as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"spam hook {spec!r}: cannot import {module_name}: {exc}") from exc
    hook = getattr(module, name, None)
    if not callable(hook):
        raise ValueError(f"spam hook {spec!r}: {module_name} has no function {name}")
    return hook


async def score_with(scorer: Scorer, message: bytes) -> SpamResult:
    result = scorer(message)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, SpamResult):
        raise TypeError(f"a spam scorer returned {type(result).__name__}, not a SpamResult")
    return result


def status_line(result: SpamResult) -> str:
    """SpamAssassin's ``X-Spam-Status`` value: ``Yes, score=1000.0 required=5.0 tests=GTUBE``."""
    tests = ",".join(result.rules) or "none"
    return f"{'Yes' if result.spam else 'No'}, score={result.score:.1f} required={result.threshold:.1f} tests={tests}"


def tag(message: bytes, result: SpamResult) -> bytes:
    """``message`` with the verdict's headers on top and any earlier X-Spam-* headers removed."""
    added = (f"X-Spam-Flag: {'YES' if result.spam else 'NO'}\r\n"
             f"X-Spam-Score: {result.score:.1f}\r\n"
             f"X-Spam-Status: {_folded(status_line(result))}\r\n").encode("ascii", "replace")
    return added + _without_spam_headers(message)


def _folded(value: str, width: int = 76) -> str:
    """Fold the tests list at commas so that no header line passes RFC 5322's 78 characters."""
    lines, line = [], ""
    for word in value.split(","):
        piece = word if not line else "," + word
        if line and len("X-Spam-Status: ") + len(line) + len(piece) > width:
            lines.append(line + ",")
            line = word
        else:
            line += piece
    lines.append(line)
    return "\r\n\t".join(lines)


def _without_spam_headers(message: bytes) -> bytes:
    """Drop X-Spam-* header fields (with their folded lines) from the header section only."""
    end = message.find(b"\r\n\r\n")
    if message.startswith(b"\r\n"):
        return message
    head, body = (message, b"") if end < 0 else (message[:end + 2], message[end + 2:])
    kept: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() in SPAM_HEADERS
        if not dropping:
            kept.append(line)
    return b"".join(kept) + body
