"""Tests for vipd.labdns over real sockets on 127.0.0.1 (and ::1 when the host has it), any free port.

dnspython's resolver and query functions over UDP and TCP (several queries on one connection, the
fallback to TCP on a truncated answer, idle and oversized connections closed); then vipd's own DNS
path against it: the daemon's DnsFacts built from ``nameservers`` and a session's early checks, and
the whole daemon in-process on uvloop, as ``vipd lab`` runs it, refusing a listed client over SMTP.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import dns.asyncquery
import dns.asyncresolver
import dns.flags
import dns.message
import dns.nameserver
import dns.rcode
import dns.resolver
import pytest
import uvloop

from support import pool_config
from vipd import config as config_mod
from vipd.labdns import DEFAULT_REASON, TEST_POINT_TXT, LabDns, dnsbl_records
from vipd.metrics import Metrics
from vipd.net.daemon import Daemon, _dns_facts
from vipd.net.screen import Screen, prepare
from vipd.policy.verdict import ACCEPT
from vipd.smtp.commands import Address

BL_ZONE = "bl.vipd.test"
LAB_ZONE = "vipd.test"
LISTED_V4 = "192.0.2.1"
BIG_TXT = [f'"{i:02d}{"x" * 58}"' for i in range(30)]     # about 1,900 octets: past any UDP limit
RECORDS = {
    **dnsbl_records(BL_ZONE, {LISTED_V4: "127.0.0.3"}),
    "good.vipd.test": {"A": ["127.0.0.10"], "MX": ["10 mx.good.vipd.test"]},
    "mx.good.vipd.test": {"A": ["127.0.0.11"]},
    "big.vipd.test": {"TXT": BIG_TXT},
}
LOOPS = {"asyncio": None, "uvloop": uvloop.new_event_loop}
T = TypeVar("T")


def serve(test: Callable[[LabDns], Awaitable[T]], *, loop: str = "asyncio", host: str = "127.0.0.1",
          **options: object) -> T:
    """Run ``test(server)`` on a new event loop with a LabDns started on ``host``; always stopped."""
    async def main() -> T:
        server = LabDns(RECORDS, (BL_ZONE, LAB_ZONE), **options)
        bound = await server.start(host, 0)
        assert bound == (host, server.port) and server.port > 0
        try:
            return await test(server)
        finally:
            await server.stop()
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main())


def resolver(server: LabDns) -> dns.asyncresolver.Resolver:
    res = dns.asyncresolver.Resolver(configure=False)
    res.nameservers = [dns.nameserver.Do53Nameserver(server.host, server.port)]
    res.lifetime = 5.0
    res.cache = None
    return res


def texts(answer: dns.resolver.Answer) -> list[str]:
    return [b"".join(rdata.strings).decode() for rdata in answer]


async def _send(writer: asyncio.StreamWriter, *queries: dns.message.Message) -> None:
    writer.write(b"".join(len(w).to_bytes(2, "big") + w for w in (q.to_wire() for q in queries)))
    await writer.drain()


async def _receive(reader: asyncio.StreamReader) -> dns.message.Message:
    size = int.from_bytes(await reader.readexactly(2), "big")
    return dns.message.from_wire(await reader.readexactly(size))


# --- dnspython against it -----------------------------------------------------------------------

@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_dnsbl_lookup_over_udp(loop: str) -> None:
    async def test(server: LabDns) -> None:
        res = resolver(server)
        listed = await res.resolve(f"2.0.0.127.{BL_ZONE}", "A", tcp=False)
        assert [r.address for r in listed] == ["127.0.0.2"]
        assert texts(await res.resolve(f"2.0.0.127.{BL_ZONE}", "TXT")) == [TEST_POINT_TXT]
        assert texts(await res.resolve(f"1.2.0.192.{BL_ZONE}", "TXT")) == [DEFAULT_REASON]
        with pytest.raises(dns.resolver.NXDOMAIN):
            await res.resolve(f"1.0.0.127.{BL_ZONE}", "A")
        with pytest.raises(dns.resolver.NoAnswer):
            await res.resolve("good.vipd.test", "AAAA")
        # REFUSED from the only nameserver: the resolver gives up, nothing is forwarded.
        with pytest.raises(dns.resolver.NoNameservers):
            await res.resolve("example.com", "A")
        reply = await dns.asyncquery.udp(dns.message.make_query("good.vipd.test", "MX"), server.host,
                                         port=server.port, timeout=5)
        assert reply.flags & dns.flags.AA and reply.answer[0][0].to_text() == "10 mx.good.vipd.test."
        assert server.failures == 0

    serve(test, loop=loop)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_dnsbl_lookup_over_tcp(loop: str) -> None:
    async def test(server: LabDns) -> None:
        query = dns.message.make_query(f"2.0.0.127.{BL_ZONE}", "A")
        reply = await dns.asyncquery.tcp(query, server.host, port=server.port, timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer[0][0].address == "127.0.0.2"
        missing = await dns.asyncquery.tcp(dns.message.make_query(f"1.0.0.127.{BL_ZONE}", "A"),
                                           server.host, port=server.port, timeout=5)
        assert missing.rcode() == dns.rcode.NXDOMAIN
        res = resolver(server)
        answer = await res.resolve(f"2.0.0.127.{BL_ZONE}", "TXT", tcp=True)
        assert texts(answer) == [TEST_POINT_TXT]

    serve(test, loop=loop)


def test_several_queries_on_one_tcp_connection() -> None:
    async def test(server: LabDns) -> None:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            first = dns.message.make_query(f"2.0.0.127.{BL_ZONE}", "A")
            second = dns.message.make_query(f"2.0.0.127.{BL_ZONE}", "TXT")
            third = dns.message.make_query("example.com", "A")
            await _send(writer, first, second)          # pipelined: answered in order
            replies = [await _receive(reader), await _receive(reader)]
            assert [r.id for r in replies] == [first.id, second.id]
            assert replies[1].answer[0][0].strings == (TEST_POINT_TXT.encode(),)
            await _send(writer, third)                   # and later on the same connection
            assert (await _receive(reader)).rcode() == dns.rcode.REFUSED
        finally:
            writer.close()

    serve(test)


def test_truncated_udp_answer_is_asked_again_over_tcp() -> None:
    async def test(server: LabDns) -> None:
        query = dns.message.make_query("big.vipd.test", "TXT", use_edns=0, payload=4096)
        reply = await dns.asyncquery.udp(query, server.host, port=server.port, timeout=5)
        assert reply.flags & dns.flags.TC and not reply.answer
        answer = await resolver(server).resolve("big.vipd.test", "TXT")   # dnspython retries on TCP
        assert len(answer) == len(BIG_TXT)

    serve(test)


def test_idle_and_oversized_tcp_connections_are_closed() -> None:
    async def test(server: LabDns) -> None:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        async with asyncio.timeout(5):
            assert await reader.read() == b""            # idle past idle_timeout
        writer.close()
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"\xff\xff" + b"\x00" * 100)        # a 65,535-octet "query"
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        # A half-sent query is dropped too, and the server goes on answering.
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"\x00\x40\x12\x34")
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        reply = await dns.asyncquery.tcp(dns.message.make_query("good.vipd.test", "A"), server.host,
                                         port=server.port, timeout=5)
        assert reply.answer

    serve(test, idle_timeout=0.3)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_stop_closes_open_connections_and_frees_the_port(loop: str) -> None:
    async def main() -> None:
        server = LabDns(RECORDS, (BL_ZONE, LAB_ZONE))
        host, port = await server.start()
        with pytest.raises(RuntimeError):
            await server.start()
        reader, writer = await asyncio.open_connection(host, port)
        await _send(writer, dns.message.make_query("good.vipd.test", "A"))
        assert (await _receive(reader)).answer
        async with asyncio.timeout(5):
            await server.stop()
            assert await reader.read() == b""
        writer.close()
        again = LabDns(RECORDS, [LAB_ZONE])                # the same port, UDP and TCP, at once
        assert (await again.start(host, port)) == (host, port)
        await again.stop()

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this host")

    async def test(server: LabDns) -> None:
        assert server.nameserver == f"[::1]:{server.port}"
        answer = await resolver(server).resolve(f"2.0.0.127.{BL_ZONE}", "A")
        assert [r.address for r in answer] == ["127.0.0.2"]
        reply = await dns.asyncquery.tcp(dns.message.make_query("good.vipd.test", "A"), "::1",
                                         port=server.port, timeout=5)
        assert reply.answer[0][0].address == "127.0.0.10"

    serve(test, host="::1")


# --- vipd's own DNS path ------------------------------------------------------------------------

def _config(server: LabDns, *, sinks: str = '"127.0.0.1:9"', extra: str = "") -> config_mod.Config:
    return config_mod.loads(f"""nameservers = ["{server.nameserver}"]

[vip.mx]
listen = ["127.0.0.1:0"]
hostname = "mx.vipd.test"
default_pool = "incoming"
relay_domains = ["example.com"]
dnsbl = [{{ zone = "{BL_ZONE}" }}]
check_sender_domain = true
{extra}
[pool.incoming]
servers = [{sinks}]
""")


def test_daemon_dns_facts_and_early_checks_use_it() -> None:
    async def test(server: LabDns) -> None:
        cfg = _config(server)
        facts = _dns_facts(cfg, Metrics())          # as the daemon builds it from `nameservers`
        assert facts is not None and facts.nameservers == ((server.host, server.port),)
        vip = cfg.vips["mx"]
        prepared = prepare(vip, frozenset())

        async def at_mail(client: str, sender: str) -> object:
            local, _, domain = sender.partition("@")
            screen = Screen(vip, client, facts, prepared)
            try:
                verdict = screen.mail(Address(local, domain, sender))
                return await verdict if isinstance(verdict, asyncio.Future) else verdict
            finally:
                screen.close()

        listed = await at_mail("127.0.0.2", "someone@good.vipd.test")
        assert listed.kind == "reject" and listed.reply.code == 554
        assert listed.reply.text == (f"Service unavailable; Client host [127.0.0.2] blocked using "
                                     f"{BL_ZONE}; {TEST_POINT_TXT}")
        also = await at_mail(LISTED_V4, "someone@good.vipd.test")
        assert also.kind == "reject" and DEFAULT_REASON in also.reply.text
        assert await at_mail("127.0.0.1", "someone@good.vipd.test") is ACCEPT
        unknown = await at_mail("127.0.0.1", "someone@nowhere.vipd.test")     # NXDOMAIN sender domain
        assert unknown.kind == "reject" and unknown.check == "sender_domain"
        assert facts.timeouts == 0 and facts.failures == 0

    serve(test)


def test_daemon_in_process_on_uvloop_refuses_a_listed_client(lab) -> None:
    sink = lab.sink("a")

    def smtp(port: int, source: str) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.good.vipd.test", timeout=15,
                          source_address=(source, 0)) as client:
            client.ehlo()
            return client.mail("someone@good.vipd.test")

    async def test(server: LabDns) -> None:
        cfg = config_mod.loads(pool_config(sink, trusted=False, admin=False,
                                           top=f'nameservers = ["{server.nameserver}"]',
                                           extra_vip=f'dnsbl = [{{ zone = "{BL_ZONE}" }}]'))
        daemon = Daemon(cfg)
        task = asyncio.ensure_future(daemon.run())
        try:
            async with asyncio.timeout(15):
                while "mx" not in daemon.bound and not task.done():
                    await asyncio.sleep(0.02)
            assert not task.done()
            port = daemon.bound["mx"][0][1]
            code, text = await asyncio.to_thread(smtp, port, "127.0.0.2")
            assert code == 554 and BL_ZONE.encode() in text and TEST_POINT_TXT.encode() in text, (code, text)
            assert (await asyncio.to_thread(smtp, port, "127.0.0.10"))[0] == 250
        finally:
            daemon.request_stop()
            await task
        assert server.queries >= 2 and server.failures == 0

    serve(test, loop="uvloop")


def test_the_command_serves_the_dnsbl_and_named_hosts_and_refuses_the_rest(tmp_path) -> None:
    """``python -m vipd.labdns`` as the lab and the bench start it: a process, stopped by PID."""
    import re
    import signal
    import subprocess
    import sys
    from support import wait_for
    log = tmp_path / "dns.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vipd.labdns", "--zone", "bl.bench.test", "--listed",
                                 "127.0.0.9", "--host", "client.bench.test=127.0.0.1", "--host",
                                 "v6.bench.test=::1"], stdout=out, stderr=subprocess.STDOUT)
    try:
        port = int(wait_for(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text()),
                            what="the DNS server").group(1))
        r = dns.resolver.Resolver(configure=False)
        r.nameservers, r.port, r.lifetime = ["127.0.0.1"], port, 5
        assert [a.address for a in r.resolve("client.bench.test", "A")] == ["127.0.0.1"]
        assert [a.address for a in r.resolve("v6.bench.test", "AAAA")] == ["::1"]
        assert [a.address for a in r.resolve("9.0.0.127.bl.bench.test", "A")] == ["127.0.0.2"]
        with pytest.raises(dns.resolver.NoAnswer):
            r.resolve("client.bench.test", "MX")
        with pytest.raises(dns.resolver.NoNameservers):      # REFUSED: not a zone it holds
            r.resolve("elsewhere.bench.test", "A")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    bad = subprocess.run([sys.executable, "-m", "vipd.labdns", "--host", "nameonly"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "--host: 'nameonly': give NAME=IP" in bad.stderr
