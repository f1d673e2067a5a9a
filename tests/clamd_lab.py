"""A real clamd (Debian's clamav-daemon) for the tests, started by backends.clamd_daemon with its
one-signature database made at test time (no signature download is possible here)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from backends.clamd_daemon import FOUND_NAME, STREAM_MAX_BYTES, ClamdDaemon, ClamdUnavailable

__all__ = ["FOUND_NAME", "STREAM_MAX_BYTES", "Clamd", "free_port", "run_clamd", "skip_or_fail"]


@dataclass
class Clamd:
    daemon: ClamdDaemon
    unix_path: str
    port: int
    start_seconds: float

    @property
    def unix(self) -> dict:
        return {"unix_path": self.unix_path}

    @property
    def tcp(self) -> dict:
        return {"host": "127.0.0.1", "port": self.port}


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set: this test must run")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_clamd(tmp_path_factory) -> Iterator[Clamd]:
    """Start clamd (skip, or fail in CI, when it cannot run); yield it; stop it."""
    daemon = ClamdDaemon(tmp_path_factory.mktemp("clamd"), port=free_port())
    try:
        try:
            daemon.start()
        except ClamdUnavailable as exc:
            skip_or_fail(str(exc))
        assert daemon.port is not None
        yield Clamd(daemon, daemon.unix_path, daemon.port, daemon.start_seconds)
    finally:
        daemon.stop()
