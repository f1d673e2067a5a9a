"""What every system under test is to the bench: something that starts on loopback in front of the
sinks, reports the processes whose CPU and memory count as its own, and stops cleanly.

Rules: a system listens on 127.0.0.1 only, relays every message to the sinks it is given (spreading
over them when it can), runs in the foreground under the bench (no daemonizing, no pid files in
/run), keeps its files under the ``workdir`` it is given, and ``stop()`` leaves no process behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["System", "Endpoint", "Unavailable"]


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Unavailable(Exception):
    """The system cannot run on this machine (a package could not be installed, ...): skipped, reported."""


class System:
    #: short name used in tables, JSON and plots ("baseline", "vipd-1w", "haproxy", ...)
    name: str = "system"
    #: one-line description for the README table
    description: str = ""

    def prepare(self, cache: Path) -> None:
        """Install what the system needs (apt-get, npm, pip, unpacking a .deb), idempotently.

        Called once per bench run before any measurement. ``cache`` is a folder kept between runs.
        Raise ``Unavailable`` if it cannot be had here.
        """

    def start(self, workdir: Path, sinks: list[Endpoint]) -> Endpoint:
        """Start in front of ``sinks``; return where the load generator connects. Blocks until ready."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """Root PIDs whose whole process trees are this system (CPU and memory are summed over them)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop every process started by ``start`` (SIGTERM, then SIGKILL after a few seconds)."""
        raise NotImplementedError

    def version(self) -> str:
        """Version string for the report (after prepare)."""
        return ""
