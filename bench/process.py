"""Starting and stopping the daemons of a bench run, always by PID.

Rules: every daemon runs in the foreground under the bench with stdout and stderr in a log file
(never a pipe nobody reads); ``stop()`` sends SIGTERM to the daemon, waits, then SIGKILLs it and
any of its descendants still alive, each by its own PID (never by name); the port a daemon bound
(port 0 means any free port) is read from its log or, for programs that do not print it, from /proc.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import proctree

__all__ = ["Daemon", "wait_for", "listening_port"]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate`` until it returns something true; TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Daemon:
    """One foreground process started by the bench, its output in ``log``."""

    name: str
    popen: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, args: list[str], log: Path, *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Daemon:
        """Start ``args`` with a fresh ``log``, opened for appending (so it may be emptied meanwhile)."""
        log.write_bytes(b"")
        with open(log, "ab") as out:
            popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=cwd)
        return cls(name, popen, log)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def check(self) -> None:
        """Raise RuntimeError with the end of the log if the daemon has exited."""
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}: {self.text()[-1500:].strip()}")

    def wait_for_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first match of ``pattern`` in the log, waiting until it appears (or the daemon dies)."""
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            self.check()
            return regex.search(self.text())
        return wait_for(found, timeout, f"{self.name} to log {pattern!r}")

    def wait_for_port(self, timeout: float = 20.0) -> int:
        """The TCP port the daemon (or one of its children) listens on, found in /proc."""
        def found() -> int | None:
            self.check()
            return next(filter(None, map(listening_port, proctree.tree([self.pid]))), None)
        return wait_for(found, timeout, f"{self.name} to listen")

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; leftover descendants are killed by PID."""
        family = proctree.tree([self.pid]) if self.alive() else []
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        for pid in family[1:]:
            _kill_leftover(pid)
        return self.popen.returncode


def _kill_leftover(pid: int) -> None:
    if proctree.alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def listening_port(pid: int) -> int | None:
    """A TCP port some socket of ``pid`` listens on, from /proc/PID/fd and /proc/PID/net/tcp{,6}."""
    inodes = _socket_inodes(pid)
    if not inodes:
        return None
    for table in ("tcp", "tcp6"):
        for local, state, inode in _tcp_rows(Path(f"/proc/{pid}/net/{table}")):
            if state == "0A" and inode in inodes:       # 0A: TCP_LISTEN
                return int(local.rsplit(":", 1)[1], 16)
    return None


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            target = os.readlink(fd.path)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _tcp_rows(path: Path) -> list[tuple[str, str, str]]:
    try:
        lines = path.read_text().splitlines()[1:]
    except OSError:
        return []
    rows = []
    for line in lines:
        fields = line.split()
        rows.append((fields[1], fields[3], fields[9]))
    return rows
