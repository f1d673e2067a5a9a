"""vipd's memory per idle session: what one more open, greeted, EHLO'd client connection costs.

Sequence, for each repeat:
1. start vipd as ``vipd-1w`` (``bench.systems.Vipd``: one worker, so one process) with the VIP's
   ``max_sessions`` above the session count, in front of one backend that refuses connections (a
   loopback port the bench holds bound but not listening): EHLO is answered by vipd itself and no
   mail is sent, so no backend is ever contacted;
2. open and close ``WARMUP_SESSIONS`` sessions, so one-time costs (first allocations of the session
   path) are not counted as per-session ones;
3. read vipd's VmRSS (/proc/PID/status);
4. open ``sessions`` TCP connections from this process, one after the other; on each read the 220
   greeting, send ``EHLO idle.test`` and read the whole 250 reply, so every session is live and has
   done some work; keep them all open;
5. wait ``SETTLE_SECONDS`` and read VmRSS again;
6. close every connection and stop vipd (SIGTERM, then SIGKILL by PID).

Figures, each the median (with min and max) over the repeats that succeeded:
- ``kib_per_session``: (after - before) / sessions, in KiB; the project's goal is at most ``GOAL_KIB``;
- ``total_mib``: after - before, in MiB;
- ``rss_before_mib`` and ``rss_after_mib``: vipd's VmRSS at steps 3 and 5.

Rules: everything on 127.0.0.1; this process's RLIMIT_NOFILE is raised (soft, then hard when
allowed) for the run when ``sessions`` needs it, before vipd starts so that vipd inherits it, and
restored afterwards; every socket is closed and vipd stopped whatever happens; a failed repeat is
kept with its error (its workdir, with vipd's log, is kept too) and the others go on. RSS is
user-space memory only: the kernel's socket buffers are not in it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from . import proctree
from .stats import Spread
from .system import Endpoint
from .systems import Vipd

__all__ = ["IdleSample", "IdleResult", "run_idle", "DEFAULT_SESSIONS", "GOAL_KIB"]

DEFAULT_SESSIONS = 1000
GOAL_KIB = 64
WARMUP_SESSIONS = 10
SETTLE_SECONDS = 1.0
SOCKET_TIMEOUT = 10.0
FD_MARGIN = 256          # descriptors besides the sessions' (vipd's listeners, logs, the bench's own)
EHLO = b"EHLO idle.test\r\n"
KIB, MIB = 1024, 1024 * 1024


@dataclass
class IdleSample:
    """One repeat: vipd's VmRSS before and after opening ``sessions`` sessions."""

    repeat: int
    sessions: int
    rss_before_bytes: int = 0
    rss_after_bytes: int = 0
    open_seconds: float = 0.0          # opening every session, greeting and EHLO included
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.rss_after_bytes > 0

    @property
    def added_bytes(self) -> int:
        return self.rss_after_bytes - self.rss_before_bytes

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class IdleResult:
    sessions: int
    repeats: int
    goal_kib: float = GOAL_KIB
    samples: list[IdleSample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)     # failed repeats, or why none could run

    def _spread(self, figure) -> Spread | None:
        return Spread.of([figure(s) for s in self.samples if s.ok])

    @property
    def kib_per_session(self) -> Spread | None:
        return self._spread(lambda s: s.added_bytes / s.sessions / KIB)

    @property
    def total_mib(self) -> Spread | None:
        return self._spread(lambda s: s.added_bytes / MIB)

    @property
    def rss_before_mib(self) -> Spread | None:
        return self._spread(lambda s: s.rss_before_bytes / MIB)

    @property
    def rss_after_mib(self) -> Spread | None:
        return self._spread(lambda s: s.rss_after_bytes / MIB)

    @property
    def meets_goal(self) -> bool | None:
        spread = self.kib_per_session
        return None if spread is None else spread.median <= self.goal_kib

    def to_json(self) -> dict:
        figures = {name: (asdict(v) if (v := getattr(self, name)) else None)
                   for name in ("kib_per_session", "total_mib", "rss_before_mib", "rss_after_mib")}
        return {"sessions": self.sessions, "repeats": self.repeats, "goal_kib": self.goal_kib,
                "meets_goal": self.meets_goal, **figures, "errors": self.errors,
                "samples": [s.to_json() for s in self.samples]}


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run_idle(sessions: int = DEFAULT_SESSIONS, repeats: int = 3) -> IdleResult:
    """Measure vipd's RSS per idle session ``repeats`` times, vipd started afresh each time."""
    result = IdleResult(sessions, repeats)
    try:
        with _enough_descriptors(sessions + WARMUP_SESSIONS + FD_MARGIN), _refusing_backend() as backend:
            for repeat in range(repeats):
                sample = _measure(repeat, sessions, backend)
                result.samples.append(sample)
                log(f"idle #{repeat + 1}: {_progress(sample)}")
                if sample.error:
                    result.errors.append(f"repeat {repeat + 1}: {sample.error}")
    except OSError as exc:
        result.errors.append(f"cannot run: {exc}")
        log(f"idle: cannot run: {exc}")
    return result


def meta() -> dict:
    """What `python -m bench idle` records about the machine next to its figures."""
    return {"command": "idle", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "cpus": os.cpu_count(), "kernel": f"{platform.system()} {platform.release()}",
            "vipd": Vipd(1).version(), "loadavg_at_start": os.getloadavg()}


def _progress(s: IdleSample) -> str:
    if not s.ok:
        return f"FAILED {s.error}"
    return (f"{s.sessions} sessions opened in {s.open_seconds:.2f} s, VmRSS {s.rss_before_bytes / MIB:.1f} -> "
            f"{s.rss_after_bytes / MIB:.1f} MiB = {s.added_bytes / s.sessions / KIB:.1f} KiB/session")


def _measure(repeat: int, sessions: int, backend: Endpoint) -> IdleSample:
    sample = IdleSample(repeat, sessions)
    workdir = Path(tempfile.mkdtemp(prefix=f"vipd-bench-idle-r{repeat}-"))
    vipd = Vipd(1, max_sessions=max(2000, 2 * (sessions + WARMUP_SESSIONS)))
    try:
        target = vipd.start(workdir, [backend])
        pid = vipd.pids()[0]
        with _Clients() as warmup:
            warmup.open(target, WARMUP_SESSIONS)
        sample.rss_before_bytes = proctree.vm_rss_bytes(pid)
        with _Clients() as clients:
            started = time.perf_counter()
            clients.open(target, sessions)
            sample.open_seconds = time.perf_counter() - started
            time.sleep(SETTLE_SECONDS)
            sample.rss_after_bytes = proctree.vm_rss_bytes(pid)
    except Exception as exc:  # noqa: BLE001 - reported with the sample; the other repeats go on
        sample.error = f"{type(exc).__name__}: {exc} (workdir {workdir})"
    finally:
        try:
            vipd.stop()
        except Exception as exc:  # noqa: BLE001
            sample.error = sample.error or f"stop failed: {type(exc).__name__}: {exc} (workdir {workdir})"
    if sample.error is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return sample


class _Clients:
    """Client connections to vipd, each greeted and EHLO'd; all closed on exit."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    def __enter__(self) -> _Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in self.socks:
            sock.close()
        self.socks.clear()

    def open(self, target: Endpoint, count: int) -> None:
        for index in range(count):
            sock = socket.create_connection((target.host, target.port), timeout=SOCKET_TIMEOUT)
            self.socks.append(sock)
            try:
                _expect(sock, b"220")
                sock.sendall(EHLO)
                _expect(sock, b"250")
            except (OSError, ValueError) as exc:
                raise RuntimeError(f"session {index + 1} of {count}: {exc}") from None


def _expect(sock: socket.socket, code: bytes) -> None:
    """Read one whole reply (up to the line whose fourth byte is a space); ValueError if not ``code``."""
    data = b""
    while not (data.endswith(b"\r\n") and data[:-2].rsplit(b"\r\n", 1)[-1][3:4] == b" "):
        chunk = sock.recv(4096)
        if not chunk:
            raise ValueError(f"vipd closed the connection, waiting for {code.decode()} (got {data!r})")
        data += chunk
    if not data.startswith(code):
        raise ValueError(f"expected {code.decode()}, got {data.strip()[:200]!r}")


@contextlib.contextmanager
def _refusing_backend() -> Iterator[Endpoint]:
    """A loopback port bound but not listening, held for the run: connections to it are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield Endpoint("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


@contextlib.contextmanager
def _enough_descriptors(need: int) -> Iterator[None]:
    """RLIMIT_NOFILE of this process (and so of the vipd it starts) at least ``need`` meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        yield
        return
    try:
        if hard == resource.RLIM_INFINITY or hard >= need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        else:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))     # raising hard: root only
    except (ValueError, OSError) as exc:
        raise OSError(f"RLIMIT_NOFILE is {soft} (hard {hard}) and cannot be raised to {need}: {exc}") from None
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
