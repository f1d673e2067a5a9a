"""A message body kept for relaying and replay: in memory while small, in a temp file when large.

The body is stored exactly as it arrived (dot-stuffed, CRLF), so it can be written to any backend
unchanged, as often as a replay needs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import IO

__all__ = ["Body", "SPILL_BYTES", "READ_BLOCK"]

SPILL_BYTES = 1024 * 1024     # above this a session's body moves to disk
READ_BLOCK = 256 * 1024


class Body:
    __slots__ = ("_chunks", "_file", "_offset", "size", "spill_bytes", "spill_dir")

    def __init__(self, spill_bytes: int = SPILL_BYTES, spill_dir: str | None = None) -> None:
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self._offset = 0
        self.size = 0
        self.spill_bytes = spill_bytes
        self.spill_dir = spill_dir

    @classmethod
    def from_file(cls, f: IO[bytes], offset: int, size: int) -> Body:
        """A body read from an open file starting at ``offset`` (a spooled message); closes it."""
        body = cls()
        body._file, body._offset, body.size = f, offset, size
        return body

    def append(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        if self.size > self.spill_bytes:
            self._file = tempfile.TemporaryFile(prefix="vipd-body-", dir=self.spill_dir)
            for chunk in self._chunks:
                self._file.write(chunk)
            self._chunks = []

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def chunks(self) -> Iterator[bytes]:
        """The body again from the start; may be called any number of times."""
        if self._file is None:
            yield from self._chunks
            return
        self._file.flush()
        self._file.seek(self._offset)
        while block := self._file.read(READ_BLOCK):
            yield block
        self._file.seek(0, 2)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._chunks = []
