"""A private clamd (ClamAV's daemon) for the lab and the tests, with a one-signature database made here.

No signature download is possible on a lab machine, so the database is one ``.ndb`` body signature for
the EICAR test string (it matches anywhere in a scanned file, also inside the MIME parts clamd decodes
itself). clamd runs in the foreground with its unix socket, a loopback TCP port, its log and temporary
files in one folder, and a small StreamMaxLength; ``stop()`` ends it by PID.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

from .child_daemon import start_until_ready, stop_child, tail_logs
from .clamd import clamd_ping
from .scanner import EICAR

__all__ = ["FOUND_NAME", "SIGNATURE", "ClamdDaemon", "ClamdUnavailable", "find_clamd"]

SIGNATURE = "Eicar-Test-Signature"
# clamd marks every name from a database that ClamAV did not sign.
FOUND_NAME = f"{SIGNATURE}.UNOFFICIAL"
STREAM_MAX_BYTES = 1024 * 1024


class ClamdUnavailable(RuntimeError):
    """clamd is not installed, or did not start."""


def find_clamd() -> str | None:
    return shutil.which("clamd") or next((p for p in ("/usr/sbin/clamd", "/usr/bin/clamd") if os.access(p, os.X_OK)),
                                         None)


class ClamdDaemon:
    def __init__(self, folder: Path, *, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.unix_path = str(self.folder / "clamd.sock")
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.start_seconds = 0.0

    @property
    def address(self) -> str:
        """As backends.content's ``--clamd`` takes it."""
        return f"unix:{self.unix_path}"

    @property
    def log(self) -> str:
        return tail_logs(self.folder, ("clamd.out", "clamd.log"))

    def write_config(self) -> Path:
        db = self.folder / "db"
        db.mkdir(parents=True, exist_ok=True)
        (db / "test.ndb").write_text(f"{SIGNATURE}:0:*:{EICAR.hex()}\n")
        tmp = self.folder / "tmp"
        tmp.mkdir(exist_ok=True)
        config = self.folder / "clamd.conf"
        tcp = f"TCPSocket {self.port}\nTCPAddr 127.0.0.1\n" if self.port else ""
        config.write_text(f"Foreground yes\nDatabaseDirectory {db}\nLocalSocket {self.unix_path}\n{tcp}"
                          f"LogFile {self.folder / 'clamd.log'}\nTemporaryDirectory {tmp}\n"
                          f"StreamMaxLength {STREAM_MAX_BYTES}\n")
        return config

    def start(self, timeout_seconds: float = 30.0) -> ClamdDaemon:
        """Start clamd and return once it answers PING; ClamdUnavailable when it cannot."""
        binary = find_clamd()
        if binary is None:
            raise ClamdUnavailable("clamd is not installed (Debian: clamav-daemon)")
        # A unix socket path is limited to 107 bytes by the kernel.
        if len(self.unix_path) >= 100:
            raise ClamdUnavailable(f"unix socket path too long for clamd: {self.unix_path}")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        self.proc, seconds = start_until_ready(
            [binary, "--foreground", f"--config-file={config}"], self.folder / "clamd.out",
            lambda: asyncio.run(clamd_ping(unix_path=self.unix_path, timeout=1)), timeout_seconds)
        if seconds is None:
            self.stop()
            raise ClamdUnavailable(f"clamd did not start:\n{self.log}")
        self.start_seconds = seconds
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_child(proc)
