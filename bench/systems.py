"""The systems the bench compares: the baseline, vipd with 1 and 2 workers, and the peers.

- ``baseline``: no relay at all; the load generator's target is the first sink. Its figures are
  the load generator against the sinks, the ceiling every relay is measured against; it has no
  processes of its own, so it has no CPU or memory figures.
- ``vipd-1w``, ``vipd-2w``: ``python -m vipd run`` with a config written into the workdir, one VIP on
  a free loopback port, one round-robin pool of the two sinks, no XCLIENT (the peers send none
  either), logging at the default level to a file.
- the peers (HAProxy, nginx, Haraka, Postfix, sendmail, aiosmtpd...) come from ``bench.peers``
  (``PEERS: list[System]``) when that module exists; without it the bench runs without them.

Rules: everything runs from this checkout's venv; a vipd config that ``vipd check-config`` refuses
(``workers = 2`` before multi-process support) makes that system Unavailable with the reason.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from . import postfix
from .process import Daemon
from .system import Endpoint, System, Unavailable

__all__ = ["Baseline", "Vipd", "core_systems", "peers", "PeersError"]

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = r"listening vip=bench address=(\S+):(\d+)"


class PeersError(Exception):
    """bench.peers exists but could not be loaded (the reason goes into the report)."""


class Baseline(System):
    name = "baseline"
    description = "smtp-source straight to smtp-sink: the load generator and sinks alone, no relay"

    def __init__(self) -> None:
        self._version = ""

    def prepare(self, cache: Path) -> None:
        self._version = f"postfix smtp-source/smtp-sink {postfix.unpack(cache).version}"

    def start(self, workdir: Path, sinks: list[Endpoint]) -> Endpoint:
        return sinks[0]

    def pids(self) -> list[int]:
        return []

    def stop(self) -> None:
        pass

    def version(self) -> str:
        return self._version


class Vipd(System):
    def __init__(self, workers: int, max_sessions: int | None = None, queued: bool = False) -> None:
        """``max_sessions``: the VIP's cap on sessions (vipd's default when None; bench.idle raises it).
        ``queued``: every message goes through the durable queue (fsynced, then delivered by the queue
        runner): the cost of the failover path, as when a pool is held and then released."""
        self.workers = workers
        self.max_sessions = max_sessions
        self.queued = queued
        self.name = f"vipd-{workers}w" + ("-queued" if queued else "")
        self.description = (f"vipd from this checkout, {workers} worker{'s' if workers > 1 else ''}"
                            + (", every message through the durable queue" if queued else ""))
        self._daemon: Daemon | None = None

    def prepare(self, cache: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            config = self._write_config(Path(tmp), [Endpoint("127.0.0.1", 2), Endpoint("127.0.0.1", 3)])
            out = subprocess.run([_python(), "-m", "vipd", "check-config", str(config)], capture_output=True,
                                 text=True, cwd=ROOT, timeout=60)
        if out.returncode != 0:
            reason = " ".join(line.split(": ", 1)[-1] for line in out.stderr.splitlines()[:-1])
            raise Unavailable(f"vipd check-config refuses the bench's config: {reason or out.stderr.strip()}")

    def start(self, workdir: Path, sinks: list[Endpoint]) -> Endpoint:
        config = self._write_config(workdir, sinks)
        self._daemon = Daemon.start(self.name, [_python(), "-m", "vipd", "run", "--config", str(config)],
                                    workdir / "vipd.log", cwd=ROOT)
        match = self._daemon.wait_for_log(_LISTENING)
        return Endpoint(match.group(1), int(match.group(2)))

    def _write_config(self, workdir: Path, sinks: list[Endpoint]) -> Path:
        servers = ", ".join(f'"{sink}"' for sink in sinks)
        cap = "" if self.max_sessions is None else f"max_sessions = {self.max_sessions}\n"
        path = workdir / "vipd.toml"
        # queue_load below any load average: accept, fsync into the spool, deliver from the queue.
        spool = 'spool_dir = "spool"\n' if self.queued else ""
        queue = "\n[queue]\nretry_min_seconds = 0.05\nconcurrency = 50\n" if self.queued else ""
        vip_queue = "queue_load = 0.000001\n" if self.queued else ""
        path.write_text(f"""\
workers = {self.workers}
grace_seconds = 2.0
{spool}
[vip.bench]
listen = ["127.0.0.1:0"]
hostname = "vipd.bench.test"
default_pool = "sinks"
trusted_networks = ["127.0.0.0/8"]   # the load generator relays to any domain
max_sessions_per_client = 0          # one client address opens every session here
{cap}{vip_queue}
[pool.sinks]
balance = "roundrobin"
servers = [{servers}]
identity = "none"
{queue}""")
        return path

    def pids(self) -> list[int]:
        return [self._daemon.pid] if self._daemon else []

    def stop(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
            self._daemon = None

    def version(self) -> str:
        return f"vipd {metadata.version('vipd')}, {sys.implementation.name} {sys.version.split()[0]}"


def _python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def peers() -> list[System]:
    """``bench.peers.PEERS``; [] when the module does not exist; PeersError when it is broken."""
    try:
        module = importlib.import_module("bench.peers")
    except ModuleNotFoundError as exc:
        if exc.name == "bench.peers":
            return []
        raise PeersError(f"bench.peers: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - another engineer's module: report, do not crash the run
        raise PeersError(f"bench.peers: {type(exc).__name__}: {exc}") from exc
    found = getattr(module, "PEERS", None)
    if not isinstance(found, list):
        raise PeersError("bench.peers has no PEERS list")
    return found


def core_systems() -> list[System]:
    """The systems of this module: baseline, vipd-1w, vipd-2w."""
    return [Baseline(), Vipd(1), Vipd(2), Vipd(1, queued=True)]
