"""The two sinks every system relays to: Postfix ``smtp-sink`` processes on free loopback ports.

Each sink throws messages away (no dump file) and, with ``-c``, writes its running counters
(``sess=N quit=N mesg=N`` followed by CR) to its log: ``delivered()`` reads the last one, so a
measurement ends only when the sinks hold every message (queueing relays deliver after they
answered the load generator). The counters count from the sink's start; ``reset_logs()`` empties
the logs between runs to keep them small (the bench opened them for appending, so the sinks keep
writing at the new end) and remembers the last count for as long as no new line follows.

Rules: started once per bench run, shared by every system, stopped by PID at the end.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .postfix import Tools
from .process import Daemon
from .system import Endpoint

__all__ = ["Sinks"]

_COUNTER = re.compile(rb"mesg=(\d+)")
_TAIL_BYTES = 200
_BACKLOG = "256"


class Sinks:
    """Two ``smtp-sink`` daemons; ``endpoints`` is what systems relay to."""

    def __init__(self, tools: Tools, workdir: Path, count: int = 2) -> None:
        self.tools = tools
        self.workdir = workdir
        self.daemons: list[Daemon] = []
        self.endpoints: list[Endpoint] = []
        self._count = count
        self._last = [0] * count

    def start(self) -> list[Endpoint]:
        for index in range(self._count):
            daemon = Daemon.start(f"smtp-sink-{index + 1}", self._args(), self.workdir / f"sink{index + 1}.log",
                                  env=self.tools.env())
            self.daemons.append(daemon)
            self.endpoints.append(Endpoint("127.0.0.1", daemon.wait_for_port()))
        return self.endpoints

    def _args(self) -> list[str]:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        # -c: counters for delivered(); nothing else is written (no -d/-D dump, no -v).
        return [str(self.tools.smtp_sink), "-c", *user, "127.0.0.1:0", _BACKLOG]

    def pids(self) -> list[int]:
        return [d.pid for d in self.daemons]

    def delivered(self) -> int:
        """Messages received by all sinks since they started."""
        return sum(self._read(index) for index in range(len(self.daemons)))

    def _read(self, index: int) -> int:
        count = _last_counter(self.daemons[index].log)
        if count is not None:
            self._last[index] = count
        return self._last[index]

    def reset_logs(self) -> None:
        """Empty the counter logs (call between runs, while the sinks are idle)."""
        for index, daemon in enumerate(self.daemons):
            daemon.check()
            self._read(index)
            os.truncate(daemon.log, 0)

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()


def _last_counter(log: Path) -> int | None:
    with open(log, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - _TAIL_BYTES))
        found = _COUNTER.findall(f.read())
    return int(found[-1]) if found else None
