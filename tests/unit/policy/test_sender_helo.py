"""Tests for vipd.policy.sender and vipd.policy.helo: every decision from given facts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vipd.policy import helo as h
from vipd.policy import sender as s
from vipd.policy.sender import DomainFacts, check_sender, is_fully_qualified
from vipd.policy.verdict import ACCEPT
from vipd.smtp.commands import NULL_PATH, Address, parse_path


def addr(text: str) -> Address:
    parsed = parse_path(f"<{text}>", allow_null=True, allow_postmaster=False)
    assert parsed is not None, text
    return parsed


def facts(status: str, addresses: tuple[str, ...] = (), mx: tuple[str, ...] = ()) -> DomainFacts:
    return DomainFacts("example.org", status, addresses, mx)  # type: ignore[arg-type]


EXISTS = facts("exists", ("192.0.2.1",), ("mx.example.org",))


# --- sender -------------------------------------------------------------------------------------

@pytest.mark.parametrize("given_facts", [None, EXISTS, facts("nxdomain"), facts("timeout")])
def test_null_sender_is_always_accepted(given_facts: DomainFacts | None) -> None:
    assert check_sender(NULL_PATH, given_facts) is ACCEPT
    assert check_sender(addr(""), given_facts) is ACCEPT


def test_address_literal_sender_is_accepted_as_it_is() -> None:
    assert check_sender(addr("user@[192.0.2.1]"), facts("nxdomain")) is ACCEPT
    assert check_sender(addr("user@[IPv6:2001:db8::1]"), None) is ACCEPT


@pytest.mark.parametrize("address", [addr("user@localhost"), addr("user@localhost."),
                                     Address("user", "", "user")])
def test_sender_must_be_fully_qualified(address: Address) -> None:
    verdict = check_sender(address, EXISTS)
    assert verdict.kind == "reject" and verdict.reply is s.SENDER_NOT_FQDN
    assert (verdict.reply.code, verdict.reply.status) == (553, "5.1.7")
    assert verdict.check == "sender_fqdn"


def test_existing_domain_is_accepted() -> None:
    assert check_sender(addr("user@example.org"), EXISTS) is ACCEPT
    assert check_sender(addr("user@example.org"), facts("exists", mx=("mx.example.org",))) is ACCEPT
    assert check_sender(addr("user@example.org"), facts("exists", ("2001:db8::1",))) is ACCEPT


def test_without_facts_there_is_no_evidence_to_refuse() -> None:
    assert check_sender(addr("user@example.org"), None) is ACCEPT


@pytest.mark.parametrize("status", ["nxdomain", "nodata"])
def test_unknown_domain_is_refused_553_5_1_8(status: str) -> None:
    verdict = check_sender(addr("user@example.org"), facts(status))
    assert verdict.kind == "reject" and verdict.check == "sender_domain"
    assert str(verdict.reply) == "553 5.1.8 Sender address rejected: Domain not found"


@pytest.mark.parametrize("status", ["timeout", "servfail"])
def test_failed_lookup_is_a_temporary_refusal(status: str) -> None:
    verdict = check_sender(addr("user@example.org"), facts(status))
    assert verdict.kind == "tempfail" and verdict.reply.is_transient
    assert (verdict.reply.code, verdict.reply.status) == (451, "4.4.3")


def test_null_mx_domain_is_refused_550_5_7_27() -> None:
    # RFC 7505: even with an A record, a null MX says the domain takes no mail (so no bounces).
    verdict = check_sender(addr("user@example.org"), facts("exists", ("192.0.2.1",), (".",)))
    assert verdict.kind == "reject" and (verdict.reply.code, verdict.reply.status) == (550, "5.7.27")


def test_null_mx_only_when_it_is_the_only_mx() -> None:
    assert not facts("exists", mx=(".", "mx.example.org")).null_mx
    assert facts("exists", mx=(".",)).null_mx


@pytest.mark.parametrize(("domain", "expected"), [
    ("example.org", True), ("a.b.c", True), ("example.org.", True), ("[192.0.2.1]", True),
    ("localhost", False), ("", False), ("localhost.", False), ("a..b", False),
])
def test_is_fully_qualified(domain: str, expected: bool) -> None:
    assert is_fully_qualified(domain) is expected


# --- HELO syntax --------------------------------------------------------------------------------

VALID_EVERYWHERE = ["mail.example.com", "MX1.Example.COM", "xn--bcher-kva.example", "a.b",
                    "[192.0.2.1]", "[IPv6:2001:db8::1]", "[ipv6:::1]", "[IPv6:::ffff:192.0.2.1]",
                    "a" * 63 + ".example", "3com.example", "host.example.c0m"]
LENIENT_ONLY = ["DESKTOP-1X2Y", "localhost", "host_name.example", "mail.example.com.", "192.0.2.1",
                "2001:db8::1"]
INVALID_EVERYWHERE = ["", ".", "-bad.example", "bad-.example", "a..b", "name.example..", "ex!ample.com",
                      "a" * 64 + ".example", "[192.0.2.256]", "[2001:db8::1]", "[IPv6:fe80::1%eth0]",
                      "[tag:content]", "[192.0.2.1", "1.2.3.999", "1.2.3", "ho st.example",
                      "[]", "[IPv6:192.0.2.1]", "[01.2.3.4]", ("a" * 60 + ".") * 5 + "example"]


@pytest.mark.parametrize("name", VALID_EVERYWHERE)
def test_valid_helo_names(name: str) -> None:
    assert h.check_helo_syntax(name) is ACCEPT
    assert h.check_helo_syntax(name, strict=True) is ACCEPT


@pytest.mark.parametrize("name", LENIENT_ONLY)
def test_lenient_accepts_what_postfix_reject_invalid_helo_hostname_accepts(name: str) -> None:
    assert h.check_helo_syntax(name) is ACCEPT
    verdict = h.check_helo_syntax(name, strict=True)
    assert verdict.kind == "reject" and (verdict.reply.code, verdict.reply.status) == (501, "5.5.2")


def test_strict_refuses_a_single_label_as_not_fully_qualified() -> None:
    assert h.check_helo_syntax("DESKTOP-1X2Y", strict=True).reply is h.HELO_NOT_FQDN
    assert h.check_helo_syntax("192.0.2.1", strict=True).reply is h.HELO_NOT_FQDN
    assert h.check_helo_syntax("host.123", strict=True).reply is h.HELO_INVALID  # numeric TLD


@pytest.mark.parametrize("name", INVALID_EVERYWHERE)
def test_invalid_helo_names(name: str) -> None:
    for strict in (False, True):
        verdict = h.check_helo_syntax(name, strict=strict)
        assert verdict.kind == "reject" and verdict.check == "helo_syntax", (name, strict)
        assert str(verdict.reply).startswith("501 5.5.2 Invalid HELO name")


@given(st.text(max_size=80))
def test_strict_is_never_more_lenient(name: str) -> None:
    strict = h.check_helo_syntax(name, strict=True)
    lenient = h.check_helo_syntax(name)
    assert strict.kind in ("accept", "reject") and lenient.kind in ("accept", "reject")
    assert not (strict is ACCEPT and lenient is not ACCEPT)


@given(st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?(?:\.[a-z](?:[a-z0-9-]{0,20}[a-z0-9])?){1,4}",
                     fullmatch=True))
def test_rfc5321_domains_pass_strict(name: str) -> None:
    assert h.check_helo_syntax(name, strict=True) is ACCEPT


def test_parse_address_literal() -> None:
    assert str(h.parse_address_literal("[192.0.2.1]")) == "192.0.2.1"
    assert str(h.parse_address_literal("[IPv6:2001:DB8::1]")) == "2001:db8::1"
    assert h.parse_address_literal("192.0.2.1") is None
    assert h.parse_address_literal("[mail.example]") is None


# --- HELO identity ------------------------------------------------------------------------------

OUR_NAMES = ["mx.vipd.test", "VIP.vipd.test."]
OUR_ADDRESSES = ["192.0.2.10", "2001:db8::10"]


@pytest.mark.parametrize("name", ["mx.vipd.test", "MX.VIPD.TEST.", "vip.vipd.test", "[192.0.2.10]",
                                  "192.0.2.10", "[IPv6:2001:db8::10]", "[IPv6:2001:DB8:0::10]",
                                  "[IPv6:::ffff:192.0.2.10]"])
def test_claiming_to_be_us_is_refused(name: str) -> None:
    verdict = h.check_helo_identity(name, OUR_NAMES, OUR_ADDRESSES, client="198.51.100.7")
    assert verdict.kind == "reject" and verdict.check == "helo_identity"
    assert str(verdict.reply) == "550 5.7.1 Helo command rejected: You are not me"


@pytest.mark.parametrize("name", ["mail.example.com", "mx.vipd.test.example", "[192.0.2.11]", "DESKTOP"])
def test_other_names_are_not_our_business(name: str) -> None:
    assert h.check_helo_identity(name, OUR_NAMES, OUR_ADDRESSES) is ACCEPT


@pytest.mark.parametrize("client", ["192.0.2.10", "::ffff:192.0.2.10", "2001:db8::10"])
def test_a_client_on_our_own_address_may_use_our_name(client: str) -> None:
    assert h.check_helo_identity("mx.vipd.test", OUR_NAMES, OUR_ADDRESSES, client=client) is ACCEPT


# --- HELO in the DNS ----------------------------------------------------------------------------

def test_helo_that_resolves_is_accepted() -> None:
    assert h.check_helo_resolves("mail.example.org", EXISTS) is ACCEPT
    assert h.check_helo_resolves("mail.example.org", facts("exists", mx=("mx.example.org",))) is ACCEPT
    assert h.check_helo_resolves("mail.example.org", None) is ACCEPT


@pytest.mark.parametrize("name", ["[192.0.2.1]", "192.0.2.1", "[IPv6:2001:db8::1]"])
def test_addresses_are_not_looked_up(name: str) -> None:
    assert h.check_helo_resolves(name, facts("nxdomain")) is ACCEPT


@pytest.mark.parametrize("status", ["nxdomain", "nodata"])
def test_unknown_helo_is_450_4_7_1_like_postfix(status: str) -> None:
    verdict = h.check_helo_resolves("nowhere.example", facts(status))
    assert verdict.kind == "tempfail" and verdict.check == "helo_dns"
    assert str(verdict.reply) == "450 4.7.1 Helo command rejected: Host not found"
    permanent = h.check_helo_resolves("nowhere.example", facts(status), permanent=True)
    assert permanent.kind == "reject" and (permanent.reply.code, permanent.reply.status) == (550, "5.7.1")


@pytest.mark.parametrize("status", ["timeout", "servfail"])
def test_helo_lookup_failure_is_temporary_even_when_permanent(status: str) -> None:
    verdict = h.check_helo_resolves("mail.example.org", facts(status), permanent=True)
    assert verdict.kind == "tempfail" and (verdict.reply.code, verdict.reply.status) == (451, "4.4.3")
