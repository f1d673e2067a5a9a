"""Test DNS for the policy tests: dnsmasq on 127.0.0.1 and a free port serving fixed test zones, and a
silent UDP server for the timeout path.

dnsmasq runs in the foreground with no configuration file, no upstream (``--local=/#/``: every name
it does not hold is NXDOMAIN, never forwarded), no /etc/hosts, bound to 127.0.0.1 only, logging each
query to a file (``queries()`` counts them). It is stopped by PID. Its data (all TTLs ``ttl``):

- ``bl.vipd.test``: RFC 5782's IPv4 test point 2.0.0.127 (A 127.0.0.2, TXT "RFC5782 test point:
  listed") and IPv6 test point ::ffff:7f00:2 (A 127.0.0.2); 4.0.0.127 answers 127.255.255.254, a
  Spamhaus-style error code; 1.0.0.127 and 10.0.0.127 are not listed.
- ``bl2.vipd.test``: 2.0.0.127 and 3.0.0.127 answer 127.0.0.4 (no TXT).
- ``good.example`` A 127.0.0.10 and MX 10 mx.good.example (A 127.0.0.11); ``mx-only.example`` MX
  only; ``helo.good.example`` A 127.0.0.12; ``nullmx.example`` MX 0 "." (RFC 7505);
  ``txt-only.example`` a TXT record and nothing else; ``bad.example`` does not exist.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

__all__ = [
    "DnsmasqMissing",
    "DnsServer",
    "SilentServer",
    "FailingServer",
    "find_dnsmasq",
    "free_port",
    "BL_ZONE",
    "BL2_ZONE",
    "LISTED_TXT",
    "IPV6_TEST_POINT",
]

HOST = "127.0.0.1"
BL_ZONE = "bl.vipd.test"
BL2_ZONE = "bl2.vipd.test"
LISTED_TXT = "RFC5782 test point: listed"
IPV6_TEST_POINT = "::ffff:7f00:2"
_IPV6_TEST_NAME = ".".join(reversed(ipaddress.IPv6Address(IPV6_TEST_POINT).exploded.replace(":", "")))

RECORDS = [
    f"--host-record=2.0.0.127.{BL_ZONE},127.0.0.2",
    f"--txt-record=2.0.0.127.{BL_ZONE},{LISTED_TXT}",
    f"--host-record={_IPV6_TEST_NAME}.{BL_ZONE},127.0.0.2",
    f"--host-record=4.0.0.127.{BL_ZONE},127.255.255.254",
    f"--host-record=2.0.0.127.{BL2_ZONE},127.0.0.4",
    f"--host-record=3.0.0.127.{BL2_ZONE},127.0.0.4",
    "--host-record=good.example,127.0.0.10",
    "--mx-host=good.example,mx.good.example,10",
    "--host-record=mx.good.example,127.0.0.11",
    "--mx-host=mx-only.example,mx.good.example,10",
    "--host-record=helo.good.example,127.0.0.12",
    "--mx-host=nullmx.example,.,0",
    "--txt-record=txt-only.example,nothing else here",
]

_QUERY_LINE = re.compile(r"query\[(\w+)\] (\S+) from ")
_PORT_CLASH = "Address already in use"


class DnsmasqMissing(RuntimeError):
    """dnsmasq is not installed (``apt-get install dnsmasq``; tests/run.sh does it as root)."""


def find_dnsmasq() -> str | None:
    # /usr/sbin is not on an ordinary user's PATH.
    found = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    return found


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now (the caller retries on a clash)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port


class DnsServer:
    """dnsmasq with the test zones. ``with DnsServer() as dns: ... dns.nameserver ...``"""

    def __init__(self, log_dir: Path | None = None, *, ttl: int = 300, attempts: int = 5) -> None:
        binary = find_dnsmasq()
        if binary is None:
            raise DnsmasqMissing("dnsmasq is not installed: apt-get install dnsmasq "
                                 "(tests/run.sh installs it when run as root)")
        self.binary = binary
        self.ttl = ttl
        self.attempts = attempts
        self._own_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="vipd-dns-")) if log_dir is None else Path(log_dir)
        self.log = self.log_dir / "dnsmasq.log"
        self.port = 0
        self.popen: subprocess.Popen | None = None

    @property
    def nameserver(self) -> str:
        """The ``ip:port`` string vipd's ``nameservers`` setting takes."""
        return f"{HOST}:{self.port}"

    def _args(self, port: int) -> list[str]:
        return [
            self.binary, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--no-poll", f"--listen-address={HOST}", f"--port={port}",
            "--bind-interfaces", "--pid-file=", "--log-queries", "--log-facility=-",
            "--local=/#/", f"--local-ttl={self.ttl}", *RECORDS,
        ]

    def start(self) -> DnsServer:
        for _ in range(self.attempts):
            port = free_port()
            with open(self.log, "wb") as fh:
                self.popen = subprocess.Popen(self._args(port), stdin=subprocess.DEVNULL,
                                              stdout=fh, stderr=subprocess.STDOUT)
            self.port = port
            if self._wait_ready():
                return self
            self._reap()
            if _PORT_CLASH not in self.log_text():
                self._fail("dnsmasq did not start")
        self._fail(f"dnsmasq found no free port in {self.attempts} tries")
        raise AssertionError("unreachable")

    def _fail(self, what: str) -> None:
        text = self.log_text()
        self.stop()
        raise RuntimeError(f"{what}:\n{text}")

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        """True once dnsmasq answers a query; False if it exited first."""
        deadline = time.monotonic() + timeout
        probe = dns.message.make_query("good.example", "A")
        while time.monotonic() < deadline:
            if self.popen is None or self.popen.poll() is not None:
                return False
            try:
                reply = dns.query.udp(probe, HOST, port=self.port, timeout=0.2)
            except (dns.exception.Timeout, OSError):
                time.sleep(0.02)
                continue
            if reply.rcode() == dns.rcode.NOERROR and reply.answer:
                return True
        self._fail(f"dnsmasq did not answer within {timeout} s")
        return False

    def _reap(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def stop(self) -> None:
        """Stop dnsmasq by its PID (SIGTERM, then SIGKILL)."""
        self._reap()
        self.popen = None
        if self._own_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def queries(self, name: str | None = None, qtype: str | None = None) -> int:
        """How many queries dnsmasq logged, for ``name`` and/or ``qtype`` when given."""
        name = name.lower().rstrip(".") if name else None
        count = 0
        for match in _QUERY_LINE.finditer(self.log_text()):
            if (qtype is None or match.group(1) == qtype) and (name is None or match.group(2).lower() == name):
                count += 1
        return count


class SilentServer:
    """A UDP socket on 127.0.0.1 that reads every query and never answers (the timeout path).

    Reading (rather than leaving the socket unread) lets the tests count what arrived.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((HOST, 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silent-dns", daemon=True)

    @property
    def nameserver(self) -> str:
        return f"{HOST}:{self.port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self._sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.received += 1
            self._answer(query, peer)

    def _answer(self, query: bytes, peer: tuple[str, int]) -> None:
        """Silent: no answer at all."""

    def start(self) -> SilentServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        self._sock.close()

    def __enter__(self) -> SilentServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FailingServer(SilentServer):
    """Answers every query SERVFAIL at once (a broken list server: the failure path, not a timeout)."""

    def _answer(self, query: bytes, peer: tuple[str, int]) -> None:
        try:
            request = dns.message.from_wire(query)
        except dns.exception.DNSException:
            return
        reply = dns.message.make_response(request)
        reply.set_rcode(dns.rcode.SERVFAIL)
        self._sock.sendto(reply.to_wire(), peer)


def _serve_by_hand() -> None:
    """``python tests/dns_server.py``: serve until SIGINT or SIGTERM, then stop dnsmasq."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):   # set both: a background job ignores SIGINT
        signal.signal(sig, lambda *_: stop.set())
    with DnsServer() as server:
        pid = server.popen.pid if server.popen else "?"
        print(f"dnsmasq (pid {pid}) on {server.nameserver}; "
              f"dig -p {server.port} @{HOST} 2.0.0.127.{BL_ZONE}", flush=True)
        while not stop.wait(0.5):
            pass


if __name__ == "__main__":
    _serve_by_hand()
