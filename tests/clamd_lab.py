"""A real clamd (Debian's clamav-daemon) for the tests, with a one-signature database made here.

No signature download is possible here, so the database is one ``.ndb`` body signature for the EICAR
string (it matches anywhere in a scanned file, also inside mail attachments clamd decodes itself).
clamd runs in the foreground with its unix socket, a loopback TCP port, its log and temporary files
in the test's folder, and a small StreamMaxLength; the fixture stops it by PID, also on failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends.clamd import clamd_ping
from backends.scanner import EICAR
from support import Proc, start, wait_for

SIGNATURE = "Eicar-Test-Signature"
# clamd marks every name from a database that is not signed by ClamAV.
FOUND_NAME = f"{SIGNATURE}.UNOFFICIAL"
STREAM_MAX_BYTES = 1024 * 1024
START_TIMEOUT = 30.0


@dataclass
class Clamd:
    proc: Proc
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


def find_clamd() -> str | None:
    return shutil.which("clamd") or next((p for p in ("/usr/sbin/clamd", "/usr/bin/clamd") if os.access(p, os.X_OK)),
                                         None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(folder: Path, port: int) -> Path:
    db = folder / "db"
    db.mkdir()
    (db / "test.ndb").write_text(f"{SIGNATURE}:0:*:{EICAR.hex()}\n")
    tmp = folder / "tmp"
    tmp.mkdir()
    config = folder / "clamd.conf"
    config.write_text(f"""\
Foreground yes
DatabaseDirectory {db}
LocalSocket {folder / "clamd.sock"}
TCPSocket {port}
TCPAddr 127.0.0.1
LogFile {folder / "clamd.log"}
TemporaryDirectory {tmp}
StreamMaxLength {STREAM_MAX_BYTES}
""")
    return config


def run_clamd(tmp_path_factory) -> Iterator[Clamd]:
    """Start clamd (skip, or fail in CI, when it cannot run); yield it; stop it."""
    binary = find_clamd()
    if binary is None:
        skip_or_fail("clamd is not installed (Debian: clamav-daemon)")
    folder = tmp_path_factory.mktemp("clamd")
    unix_path = str(folder / "clamd.sock")
    assert len(unix_path) < 100, f"unix socket path too long for clamd: {unix_path}"
    port = free_port()
    config = write_config(folder, port)
    began = time.monotonic()
    proc = start("clamd", [binary, "--foreground", f"--config-file={config}"], folder / "clamd.out")
    try:
        try:
            wait_for(lambda: not proc.alive() or asyncio.run(clamd_ping(unix_path=unix_path, timeout=1)),
                     timeout=START_TIMEOUT, interval=0.05, what="clamd to answer PING")
        except TimeoutError:
            pass
        if not proc.alive() or not asyncio.run(clamd_ping(unix_path=unix_path)):
            log = (folder / "clamd.log").read_text(errors="replace") if (folder / "clamd.log").exists() else ""
            skip_or_fail(f"clamd did not start: {proc.text()[-2000:]}{log[-2000:]}")
        yield Clamd(proc, unix_path, port, time.monotonic() - began)
    finally:
        proc.stop()


