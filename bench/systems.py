"""The systems the bench compares: the baseline, vipd with 1 and 2 workers, and the peers.

- ``baseline``: no relay at all; the load generator's target is the first sink. Its figures are
  the load generator against the sinks, the ceiling every relay is measured against; it has no
  processes of its own, so it has no CPU or memory figures.
- ``vipd-1w``, ``vipd-2w``: ``python -m vipd run`` with a config written into the workdir, one VIP on
  a free loopback port, one round-robin pool of the two sinks, no XCLIENT (the peers send none
  either), logging at the default level to a file.
- ``vipd-1w-queued``: every message through the durable queue (the failover path's cost).
- ``vipd-1w-checks``: the early checks an Internet-facing VIP runs, all on: relay control by
  ``relay_domains`` (the load generator is not trusted), an access map of 2,000 entries, a DNSBL,
  the sender's domain and the HELO name resolved (strict HELO), against a DNS server of ours on
  loopback (``python -m vipd.labdns``; its CPU is not counted: it stands for the Internet's DNS).
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
from .loads import HELO, RECIPIENT, SENDER
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
    def __init__(self, workers: int, max_sessions: int | None = None, queued: bool = False,
                 checks: bool = False) -> None:
        """``max_sessions``: the VIP's cap on sessions (vipd's default when None; bench.idle raises it).
        ``queued``: every message goes through the durable queue (fsynced, then delivered by the queue
        runner): the cost of the failover path, as when a pool is held and then released.
        ``checks``: the early checks on (the module docstring says which)."""
        self.workers = workers
        self.max_sessions = max_sessions
        self.queued = queued
        self.checks = checks
        self.name = f"vipd-{workers}w" + ("-queued" if queued else "") + ("-checks" if checks else "")
        self.description = (f"vipd from this checkout, {workers} worker{'s' if workers > 1 else ''}"
                            + (", every message through the durable queue" if queued else "")
                            + (", early checks on (relay control, access map, DNSBL, sender and HELO DNS)"
                               if checks else ""))
        self._daemon: Daemon | None = None
        self._dns: Daemon | None = None

    def prepare(self, cache: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            config = self._write_config(Path(tmp), [Endpoint("127.0.0.1", 2), Endpoint("127.0.0.1", 3)])
            out = subprocess.run([_python(), "-m", "vipd", "check-config", str(config)], capture_output=True,
                                 text=True, cwd=ROOT, timeout=60)
        if out.returncode != 0:
            reason = " ".join(line.split(": ", 1)[-1] for line in out.stderr.splitlines()[:-1])
            raise Unavailable(f"vipd check-config refuses the bench's config: {reason or out.stderr.strip()}")

    def start(self, workdir: Path, sinks: list[Endpoint]) -> Endpoint:
        nameserver = None
        if self.checks:
            sender_domain, helo = SENDER.rpartition("@")[2], HELO
            self._dns = Daemon.start("labdns", [_python(), "-m", "vipd.labdns", "--zone", _DNSBL_ZONE,
                                                "--host", f"{sender_domain}=127.0.0.1", "--host", f"{helo}=127.0.0.1"],
                                     workdir / "dns.log", cwd=ROOT)
            nameserver = self._dns.wait_for_log(r"listening on (\S+) ").group(1)
        config = self._write_config(workdir, sinks, nameserver)
        self._daemon = Daemon.start(self.name, [_python(), "-m", "vipd", "run", "--config", str(config)],
                                    workdir / "vipd.log", cwd=ROOT)
        match = self._daemon.wait_for_log(_LISTENING)
        return Endpoint(match.group(1), int(match.group(2)))

    def _write_config(self, workdir: Path, sinks: list[Endpoint], nameserver: str | None = None) -> Path:
        servers = ", ".join(f'"{sink}"' for sink in sinks)
        cap = "" if self.max_sessions is None else f"max_sessions = {self.max_sessions}\n"
        path = workdir / "vipd.toml"
        # queue_load below any load average: accept, fsync into the spool, deliver from the queue.
        spool = 'spool_dir = "spool"\n' if self.queued else ""
        queue = "\n[queue]\nretry_min_seconds = 0.05\nconcurrency = 50\n" if self.queued else ""
        vip_queue = "queue_load = 0.000001\n" if self.queued else ""
        if self.checks:
            access = workdir / "access"
            access.write_text(_access_map())
            top = f'nameservers = ["{nameserver or "127.0.0.1:53"}"]\n'
            policy = (f'relay_domains = ["{RECIPIENT.rpartition("@")[2]}"]   # the load generator is not trusted\n'
                      f'access = "{access}"\ndnsbl = [{{ zone = "{_DNSBL_ZONE}" }}]\n'
                      "check_sender_domain = true\nhelo_strict = true\nreject_unknown_helo = true\n")
        else:
            top = ""
            policy = 'trusted_networks = ["127.0.0.0/8"]   # the load generator relays to any domain\n'
        path.write_text(f"""\
workers = {self.workers}
grace_seconds = 2.0
{top}{spool}
[vip.bench]
listen = ["127.0.0.1:0"]
hostname = "vipd.bench.test"
default_pool = "sinks"
{policy}max_sessions_per_client = 0          # one client address opens every session here
max_messages_per_session = 1000000   # smtp-source sends them all on one connection, as the peers allow
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
        if self._dns is not None:
            self._dns.stop()
            self._dns = None

    def version(self) -> str:
        return f"vipd {metadata.version('vipd')}, {sys.implementation.name} {sys.version.split()[0]}"


_DNSBL_ZONE = "bl.bench.test"


def _access_map(entries: int = 2000) -> str:
    """A site's access map: many entries, none of which names the bench's client, sender or recipient."""
    lines = ["# written by bench.systems: the early checks' access map"]
    for i in range(entries // 2):
        lines.append(f"Connect:10.{i // 250}.{i % 250}     REJECT")
        lines.append(f"From:spammer{i}.example     REJECT")
    return "\n".join(lines) + "\n"


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
    """The systems of this module: baseline, vipd-1w, vipd-2w, vipd-1w-queued, vipd-1w-checks."""
    return [Baseline(), Vipd(1), Vipd(2), Vipd(1, queued=True), Vipd(1, checks=True)]
