"""Log lines in Postfix's vocabulary, written in batches so the per-message path stays cheap.

One line per session and one per transaction (STYLE.md section 7). A direct ``logging`` call per
transaction costs more than the rest of a lean relay's work, so lines go into a list that a timer
flushes every ``FLUSH_SECONDS`` (and at exit). Lines are logfmt-like: ``key=value``; values with spaces
or quotes are quoted. Bodies are never logged.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from typing import TextIO

__all__ = ["LogBuffer", "fmt", "quote"]

FLUSH_SECONDS = 0.1
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


_PLAIN = re.compile(r'[^\s"=\\]+')


def quote(value: object) -> str:
    text = str(value)
    if _PLAIN.fullmatch(text) and text.isprintable():
        return text
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    if not text.isprintable():
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return f'"{text}"'


def fmt(**fields: object) -> str:
    return " ".join(f"{k}={quote(v)}" for k, v in fields.items() if v is not None)


class LogBuffer:
    """Collects lines and writes them out in batches."""

    def __init__(self, stream: TextIO | None = None, level: str = "info", name: str = "vipd") -> None:
        self.stream = stream or sys.stderr
        self.name = name
        self.level = _LEVELS.get(level, 20)
        self._lines: list[str] = []
        self._stamp_second = 0
        self._stamp = ""
        self._handle: asyncio.TimerHandle | None = None

    def set_level(self, level: str) -> None:
        self.level = _LEVELS.get(level, 20)

    def info(self, line: str) -> None:
        self._add(20, line)

    def warning(self, line: str) -> None:
        self._add(30, "warning: " + line)

    def error(self, line: str) -> None:
        self._add(40, "error: " + line)

    def debug(self, line: str) -> None:
        if self.level <= 10:
            self._add(10, "debug: " + line)

    def _add(self, level: int, line: str) -> None:
        if level < self.level:
            return
        now = int(time.time())
        if now != self._stamp_second:
            self._stamp_second = now
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
        self._lines.append(f"{self._stamp} {self.name}: {line}\n")
        if self._handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._handle = loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        self._handle = None
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except (OSError, ValueError):
            pass
