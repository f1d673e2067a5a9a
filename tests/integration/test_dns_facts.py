"""Tests for vipd.policy.dnsfacts against a real dnsmasq on 127.0.0.1 (tests/dns_server.py).

DNSBL listings with weights, filters and the TXT in the reply; sender and HELO domains; the TTL
cache (queries counted in dnsmasq's log and in DnsFacts); the timeout and failure paths (a silent and
a SERVFAIL server). Skips only when dnsmasq is missing and CI is unset; in CI a missing dnsmasq fails.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import dns.message
import dns.rrset
import pytest

from dns_server import (BL2_ZONE, BL_ZONE, IPV6_TEST_POINT, LISTED_TXT, DnsmasqMissing, DnsServer,
                        FailingServer, SilentServer)
from support import wait_for
from vipd.policy import dnsfacts
from vipd.policy.dnsbl import ListingFacts, TimeoutFacts, Zone, failures, interpret
from vipd.policy.dnsfacts import DnsFacts, parse_nameserver
from vipd.policy.helo import check_helo_resolves
from vipd.policy.sender import check_sender
from vipd.policy.verdict import ACCEPT
from vipd.smtp.commands import Address

BL = Zone(BL_ZONE)
BL2 = Zone(BL2_ZONE, weight=2, accept=("127.0.0.4",))
TIMEOUT = 0.5
MARGIN = 0.25


@pytest.fixture(scope="module")
def dnsmasq() -> Iterator[DnsServer]:
    try:
        server = DnsServer().start()
    except DnsmasqMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI is set: this test must run)")
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sender(domain: str) -> Address:
    return Address("user", domain, f"user@{domain}")


def logged(server: DnsServer, name: str, qtype: str, expected: int) -> None:
    """Wait until dnsmasq's log shows ``expected`` queries (it writes its log a moment later)."""
    wait_for(lambda: server.queries(name, qtype) >= expected, timeout=5, what=f"{qtype} {name} logged")
    time.sleep(0.05)
    assert server.queries(name, qtype) == expected


# --- DNSBL --------------------------------------------------------------------------------------

def test_rfc5782_test_point_is_listed_with_its_txt(dnsmasq: DnsServer) -> None:
    facts = DnsFacts([dnsmasq.nameserver])
    answers = asyncio.run(facts.dnsbl("127.0.0.2", [BL]))
    assert answers == {BL_ZONE: ListingFacts(("127.0.0.2",), LISTED_TXT)}
    verdict = interpret(answers, [BL], 1, client="127.0.0.2")
    assert verdict.reply.to_bytes() == (b"554 5.7.1 Service unavailable; Client host [127.0.0.2] "
                                        b"blocked using bl.vipd.test; RFC5782 test point: listed\r\n")


@pytest.mark.parametrize("client", ["127.0.0.1", "127.0.0.10", "192.0.2.1", "2001:db8::1"])
def test_not_listed(dnsmasq: DnsServer, client: str) -> None:
    facts = DnsFacts([dnsmasq.nameserver])
    answers = asyncio.run(facts.dnsbl(client, [BL, BL2]))
    assert answers == {BL_ZONE: None, BL2_ZONE: None}
    assert interpret(answers, [BL, BL2], 1, client=client) is ACCEPT


def test_ipv6_lookup_uses_nibbles(dnsmasq: DnsServer) -> None:
    facts = DnsFacts([dnsmasq.nameserver])
    mapped = asyncio.run(facts.dnsbl(IPV6_TEST_POINT, [BL]))         # unmapped: 2.0.0.127
    nibbles = asyncio.run(facts.dnsbl(IPV6_TEST_POINT, [BL], unmap=False))
    assert mapped[BL_ZONE] == ListingFacts(("127.0.0.2",), LISTED_TXT)
    assert nibbles[BL_ZONE] == ListingFacts(("127.0.0.2",), None)       # the v6 point has no TXT
    assert dnsmasq.queries("2.0.0.0.0.0.f.7.f.f.f.f." + "0." * 20 + BL_ZONE, "A") >= 1


def test_weights_filters_and_threshold(dnsmasq: DnsServer) -> None:
    facts = DnsFacts([dnsmasq.nameserver])
    zones = [BL, BL2]
    both = asyncio.run(facts.dnsbl("127.0.0.2", zones))       # 1 + 2
    only_bl2 = asyncio.run(facts.dnsbl("127.0.0.3", zones))   # 2
    assert both[BL2_ZONE] == ListingFacts(("127.0.0.4",), None)
    assert interpret(both, zones, 3, client="127.0.0.2").kind == "reject"
    assert interpret(only_bl2, zones, 3, client="127.0.0.3") is ACCEPT
    verdict = interpret(only_bl2, zones, 2, client="127.0.0.3")
    assert verdict.reply.text == "Service unavailable; Client host [127.0.0.3] blocked using bl2.vipd.test"


def test_filtered_answer_does_not_count_and_fetches_no_txt(dnsmasq: DnsServer) -> None:
    picky = Zone(BL2_ZONE, weight=5, accept=("127.0.0.2-127.0.0.3",))
    facts = DnsFacts([dnsmasq.nameserver])
    name = f"3.0.0.127.{BL2_ZONE}"
    a_before, txt_before = dnsmasq.queries(name, "A"), dnsmasq.queries(name, "TXT")
    answers = asyncio.run(facts.dnsbl("127.0.0.3", [picky]))
    assert answers[BL2_ZONE] == ListingFacts(("127.0.0.4",))
    assert interpret(answers, [picky], 1, client="127.0.0.3") is ACCEPT
    logged(dnsmasq, name, "A", a_before + 1)
    assert dnsmasq.queries(name, "TXT") == txt_before and facts.queries == 1


def test_error_code_answer_is_not_a_listing(dnsmasq: DnsServer) -> None:
    facts = DnsFacts([dnsmasq.nameserver])
    answers = asyncio.run(facts.dnsbl("127.0.0.4", [BL]))
    assert answers[BL_ZONE] == ListingFacts(("127.255.255.254",))
    assert interpret(answers, [BL], 1, client="127.0.0.4") is ACCEPT


def test_zones_are_queried_concurrently_and_observed(dnsmasq: DnsServer) -> None:
    seen: list[tuple[str, float]] = []
    facts = DnsFacts([dnsmasq.nameserver], observe=lambda label, s: seen.append((label, s)))
    asyncio.run(facts.dnsbl("127.0.0.2", [BL, BL2]))
    # A for both zones, TXT for both (both listed): four queries, each observed under its zone.
    assert sorted(label for label, _ in seen) == [BL_ZONE, BL_ZONE, BL2_ZONE, BL2_ZONE]
    assert all(0 <= s < TIMEOUT for _, s in seen)
    asyncio.run(facts.dnsbl("127.0.0.2", [BL, BL2]))
    assert len(seen) == 4                      # cache hits are not observed
    assert facts.queries == 4 and facts.cache_hits == 4


# --- the cache ----------------------------------------------------------------------------------

def test_positive_answers_are_cached_for_their_ttl(dnsmasq: DnsServer) -> None:
    clock = FakeClock()
    facts = DnsFacts([dnsmasq.nameserver], clock=clock)
    name = f"2.0.0.127.{BL_ZONE}"
    before = dnsmasq.queries(name, "A")
    first = asyncio.run(facts.dnsbl("127.0.0.2", [BL]))
    logged(dnsmasq, name, "A", before + 1)
    clock.now += dnsmasq.ttl - 1
    assert asyncio.run(facts.dnsbl("127.0.0.2", [BL])) == first
    logged(dnsmasq, name, "A", before + 1)     # answered from the cache
    assert (facts.queries, facts.cache_hits) == (2, 2)   # A and TXT, then both from the cache
    clock.now += 2                             # past the TTL
    asyncio.run(facts.dnsbl("127.0.0.2", [BL]))
    logged(dnsmasq, name, "A", before + 2)
    assert facts.queries == 4


def test_negative_answers_are_cached_for_the_default_without_soa(dnsmasq: DnsServer) -> None:
    clock = FakeClock()
    facts = DnsFacts([dnsmasq.nameserver], clock=clock, negative_ttl=10)
    name = "nowhere.bad.example"
    asyncio.run(facts.domain(name))
    logged(dnsmasq, name, "MX", 1)
    clock.now += 9
    assert asyncio.run(facts.domain(name)).status == "nxdomain"
    logged(dnsmasq, name, "MX", 1)
    clock.now += 2
    asyncio.run(facts.domain(name))
    logged(dnsmasq, name, "MX", 2)


def test_concurrent_lookups_share_one_query(dnsmasq: DnsServer) -> None:
    facts = DnsFacts([dnsmasq.nameserver])

    async def both() -> list:
        return await asyncio.gather(facts.domain("helo.good.example"), facts.domain("HELO.good.example."))

    first, second = asyncio.run(both())
    assert first == second and first.status == "exists"
    assert facts.queries == 3                  # MX, A, AAAA once each
    logged(dnsmasq, "helo.good.example", "A", 1)


def test_negative_ttl_comes_from_the_soa() -> None:
    response = dns.message.make_response(dns.message.make_query("x.example", "A"))
    response.authority.append(dns.rrset.from_text(
        "example.", 900, "IN", "SOA", "ns.example. host.example. 1 7200 900 1209600 300"))
    assert dnsfacts._negative_ttl(response, 30.0) == 300.0      # MINIMUM below the SOA's TTL
    response.authority[0].ttl = 60
    assert dnsfacts._negative_ttl(response, 30.0) == 60.0
    assert dnsfacts._negative_ttl(None, 30.0) == 30.0


# --- domains ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("domain", "status", "verdict"), [
    ("good.example", "exists", "accept"),
    ("mx-only.example", "exists", "accept"),
    ("bad.example", "nxdomain", "553 5.1.8"),
    ("txt-only.example", "nodata", "553 5.1.8"),
    ("nullmx.example", "exists", "550 5.7.27"),
])
def test_sender_domains(dnsmasq: DnsServer, domain: str, status: str, verdict: str) -> None:
    facts = asyncio.run(DnsFacts([dnsmasq.nameserver]).domain(domain))
    assert facts.status == status
    result = check_sender(sender(domain), facts)
    assert (result is ACCEPT) if verdict == "accept" else str(result.reply).startswith(verdict)


def test_domain_records(dnsmasq: DnsServer) -> None:
    facts = asyncio.run(DnsFacts([dnsmasq.nameserver]).domain("Good.Example."))
    assert (facts.name, facts.addresses, facts.mx) == ("good.example", ("127.0.0.10",), ("mx.good.example",))
    assert asyncio.run(DnsFacts([dnsmasq.nameserver]).domain("nullmx.example")).null_mx


def test_helo_resolves(dnsmasq: DnsServer) -> None:
    facts = DnsFacts([dnsmasq.nameserver])
    assert check_helo_resolves("helo.good.example", asyncio.run(facts.domain("helo.good.example"))) is ACCEPT
    unknown = check_helo_resolves("helo.bad.example", asyncio.run(facts.domain("helo.bad.example")))
    assert str(unknown.reply).startswith("450 4.7.1")


def test_names_that_cannot_exist_are_nxdomain_without_a_query(dnsmasq: DnsServer) -> None:
    facts = DnsFacts([dnsmasq.nameserver])
    assert asyncio.run(facts.domain("a" * 64 + ".example")).status == "nxdomain"
    assert facts.queries == 0


# --- timeouts and failures ----------------------------------------------------------------------

def test_timeout_is_bounded_never_listed_and_counted() -> None:
    with SilentServer() as silent:
        facts = DnsFacts([silent.nameserver], timeout=TIMEOUT)
        started = time.monotonic()
        answers = asyncio.run(facts.dnsbl("127.0.0.2", [BL, BL2]))
        elapsed = time.monotonic() - started
        assert elapsed < TIMEOUT + MARGIN
        assert answers == {BL_ZONE: TimeoutFacts("timeout"), BL2_ZONE: TimeoutFacts("timeout")}
        assert interpret(answers, [BL, BL2], 1, client="127.0.0.2") is ACCEPT
        assert failures(answers) == [BL_ZONE, BL2_ZONE]
        assert facts.timeouts == 2 and silent.received >= 2
        # A timeout is not cached: the next client asks again.
        asyncio.run(facts.dnsbl("127.0.0.2", [BL]))
        assert facts.timeouts == 3 and facts.cache_hits == 0


def test_sender_domain_timeout_is_a_451() -> None:
    with SilentServer() as silent:
        facts = DnsFacts([silent.nameserver], timeout=TIMEOUT)
        started = time.monotonic()
        domain = asyncio.run(facts.domain("good.example"))
        assert time.monotonic() - started < TIMEOUT + MARGIN
        assert domain.status == "timeout" and facts.timeouts == 3
        assert str(check_sender(sender("good.example"), domain).reply).startswith("451 4.4.3")


def test_dead_first_nameserver_leaves_time_for_the_second(dnsmasq: DnsServer) -> None:
    # Each server gets an equal share of the timeout; the whole call stays within the timeout, so
    # the TXT lookup (which again tries the dead server first) may find its budget spent.
    with SilentServer() as silent:
        facts = DnsFacts([silent.nameserver, dnsmasq.nameserver], timeout=1.0)
        started = time.monotonic()
        answers = asyncio.run(facts.dnsbl("127.0.0.2", [BL]))
        assert time.monotonic() - started < 1.0 + MARGIN
        listing = answers[BL_ZONE]
        assert isinstance(listing, ListingFacts) and listing.addresses == ("127.0.0.2",)
        assert interpret(answers, [BL], 1, client="127.0.0.2").kind == "reject"
        domain = asyncio.run(facts.domain("good.example"))
        assert domain.status == "exists"


def test_servfail_is_a_failure_not_a_listing() -> None:
    with FailingServer() as failing:
        facts = DnsFacts([failing.nameserver], timeout=TIMEOUT)
        started = time.monotonic()
        answers = asyncio.run(facts.dnsbl("127.0.0.2", [BL]))
        assert time.monotonic() - started < TIMEOUT
        assert answers == {BL_ZONE: TimeoutFacts("servfail")}
        assert facts.failures == 1 and facts.timeouts == 0
        assert interpret(answers, [BL], 1, client="127.0.0.2") is ACCEPT
        domain = asyncio.run(facts.domain("good.example"))
        assert domain.status == "servfail"
        assert check_sender(sender("good.example"), domain).kind == "tempfail"


# --- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1", ("127.0.0.1", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("::1", ("::1", 53)), ("[::1]:5353", ("::1", 5353)), ("[::1]", ("::1", 53)),
])
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["ns.example", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:x",
                                  "[::1]5353", "", "1.2.3.4.5"])
def test_bad_nameservers_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(text)


def test_no_nameserver_is_refused_rather_than_using_resolv_conf() -> None:
    with pytest.raises(ValueError):
        DnsFacts([])
