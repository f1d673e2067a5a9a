"""CPU time and memory of process trees, read from /proc.

Rules:
- A system's processes are the PIDs it reports and all their live descendants, found again at every
  reading (workers and per-connection children come and go).
- CPU is utime+stime+cutime+cstime (/proc/PID/stat fields 14-17) summed over the tree. Taken before
  and after a measurement, the difference counts every process that ran meanwhile: live ones by
  their own times, forked-and-reaped ones through their parent's cutime/cstime.
- Memory is the sum of RSS (field 24) over the tree; ``PeakRss`` samples it every 100 ms in a
  thread and keeps the largest sum. Pages shared between processes count once per process.
  ``vm_rss_bytes`` is one process's VmRSS from /proc/PID/status (the same figure, read by bench.idle).
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict

__all__ = ["tree", "alive", "cpu_seconds", "rss_bytes", "vm_rss_bytes", "PeakRss"]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
# Indexes into the fields after "(comm)": field N of proc(5) is at N - 3.
_STATE, _PPID, _UTIME, _CSTIME, _RSS = 0, 1, 11, 14, 21


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2:].decode().split()


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            kids[int(fields[_PPID])].append(int(entry.name))
    return kids


def tree(roots: list[int]) -> list[int]:
    """``roots`` that still exist and all their descendants, parents before children."""
    kids = _children()
    found, todo = [], [pid for pid in roots if alive(pid)]
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        todo.extend(kids.get(pid, ()))
    return found


def alive(pid: int) -> bool:
    """True for a running process; False for a gone or zombie one."""
    fields = _stat(pid)
    return fields is not None and fields[_STATE] != "Z"


def cpu_seconds(roots: list[int]) -> float:
    """utime+stime+cutime+cstime summed over the trees of ``roots``, in seconds."""
    ticks = 0
    for pid in tree(roots):
        if (fields := _stat(pid)) is not None:
            ticks += sum(int(v) for v in fields[_UTIME:_CSTIME + 1])
    return ticks / _TICKS


def rss_bytes(roots: list[int]) -> int:
    """Resident set sizes summed over the trees of ``roots``."""
    pages = 0
    for pid in tree(roots):
        if (fields := _stat(pid)) is not None:
            pages += int(fields[_RSS])
    return pages * _PAGE


def vm_rss_bytes(pid: int) -> int:
    """One process's resident set size, the ``VmRSS`` line of /proc/PID/status (kB there)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ProcessLookupError(f"no VmRSS in /proc/{pid}/status (a zombie?)")


class PeakRss:
    """The largest ``rss_bytes(roots)`` seen while running, sampled every ``interval`` seconds.

    Usage: ``with PeakRss(pids) as peak: ...`` then ``peak.bytes``.
    """

    def __init__(self, roots: list[int], interval: float = 0.1) -> None:
        self.roots = roots
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        self.bytes = max(self.bytes, rss_bytes(self.roots))
