"""Tests for vipd.policy.dnsbl: query names (RFC 5782), zone filters, weights, threshold, reply text."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vipd.policy.dnsbl import (
    DEFAULT_TEMPLATE,
    ListingFacts,
    TimeoutFacts,
    Zone,
    check_template,
    failures,
    hits,
    interpret,
    query_name,
    score,
)
from vipd.policy.verdict import ACCEPT

BL = Zone("bl.vipd.test")
LISTED = ListingFacts(("127.0.0.2",), "RFC5782 test point: listed")


# --- query names --------------------------------------------------------------------------------

def test_ipv4_query_name_reverses_the_octets() -> None:
    assert query_name("192.0.2.99", "bl.example") == "99.2.0.192.bl.example"
    # RFC 5782 section 5: the IPv4 test points.
    assert query_name("127.0.0.2", BL) == "2.0.0.127.bl.vipd.test"
    assert query_name("127.0.0.1", BL) == "1.0.0.127.bl.vipd.test"


def test_ipv6_query_name_is_reversed_nibbles() -> None:
    # The example of RFC 5782 section 2.4.
    assert query_name("2001:db8:1:2:3:4:567:89ab", "ugly.example.com") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com")


def test_ipv4_mapped_client_is_looked_up_as_ipv4_unless_asked_not_to() -> None:
    assert query_name("::ffff:127.0.0.2", BL) == "2.0.0.127.bl.vipd.test"
    assert query_name(ipaddress.ip_address("::ffff:7f00:2"), BL, unmap=False) == (
        "2.0.0.0.0.0.f.7.f.f.f.f." + "0." * 20 + "bl.vipd.test")


def test_zone_names_are_normalised() -> None:
    assert Zone("BL.Example.ORG.").name == "bl.example.org"
    assert query_name("192.0.2.1", "BL.Example.") == "1.2.0.192.bl.example"


@given(st.ip_addresses(v=4))
def test_ipv4_query_name_round_trips(address: ipaddress.IPv4Address) -> None:
    name = query_name(address, BL)
    octets = name.removesuffix(".bl.vipd.test").split(".")
    assert ipaddress.IPv4Address(".".join(reversed(octets))) == address


@given(st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None))
def test_ipv6_query_name_has_32_nibbles(address: ipaddress.IPv6Address) -> None:
    labels = query_name(address, BL).removesuffix(".bl.vipd.test").split(".")
    assert len(labels) == 32 and all(len(x) == 1 and x in "0123456789abcdef" for x in labels)
    assert int("".join(reversed(labels)), 16) == int(address)


# --- zones and their filters --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["localhost", "", "bad..zone", "-bad.zone", "bad zone.org", "a" * 64 + ".org"])
def test_bad_zone_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        Zone(name)


@pytest.mark.parametrize("accept", [("127.0.0.300",), ("127.0.0.9-127.0.0.2",), (), ("bogus",)])
def test_bad_filters_are_refused(accept: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Zone("bl.example", accept=accept)


def test_default_filter_is_127_8_without_the_error_codes() -> None:
    assert BL.matches(["127.0.0.2"])
    assert BL.matches(["127.1.2.3"])
    assert not BL.matches(["127.255.255.254"])     # Spamhaus: "query via a public resolver"
    assert not BL.matches(["127.255.255.252"])
    assert not BL.matches(["192.0.2.1"])           # an NXDOMAIN-rewriting resolver's answer
    assert not BL.matches(["not-an-address"])
    assert not BL.matches([])
    assert BL.matches(["192.0.2.1", "127.0.0.2"])  # any answer that passes will do


def test_range_address_and_cidr_filters() -> None:
    zone = Zone("zen.example", accept=("127.0.0.2-127.0.0.11", "127.0.1.7", "127.0.2.0/24"))
    assert zone.matches(["127.0.0.2"]) and zone.matches(["127.0.0.11"])
    assert not zone.matches(["127.0.0.1"]) and not zone.matches(["127.0.0.12"])
    assert zone.matches(["127.0.1.7"]) and not zone.matches(["127.0.1.8"])
    assert zone.matches(["127.0.2.200"]) and not zone.matches(["127.0.3.0"])


def test_a_lone_filter_string_is_one_filter() -> None:
    zone = Zone("bl.example", accept="127.0.0.4")  # type: ignore[arg-type]
    assert zone.accept == ("127.0.0.4",)
    assert zone.matches(["127.0.0.4"]) and not zone.matches(["127.0.0.2"])


# --- interpretation -----------------------------------------------------------------------------

def test_listed_client_is_refused_554_with_the_txt() -> None:
    verdict = interpret({"bl.vipd.test": LISTED}, [BL], 1, client="127.0.0.2")
    assert verdict.kind == "reject" and verdict.check == "dnsbl"
    assert (verdict.reply.code, verdict.reply.status) == (554, "5.7.1")
    assert verdict.reply.text == ("Service unavailable; Client host [127.0.0.2] blocked using "
                                  "bl.vipd.test; RFC5782 test point: listed")


def test_without_txt_the_suffix_is_left_out() -> None:
    verdict = interpret({"bl.vipd.test": ListingFacts(("127.0.0.2",))}, [BL], client="127.0.0.2")
    assert verdict.reply.text == "Service unavailable; Client host [127.0.0.2] blocked using bl.vipd.test"


def test_not_listed_is_accepted() -> None:
    assert interpret({"bl.vipd.test": None}, [BL], 1, client="127.0.0.1") is ACCEPT
    assert interpret({}, [BL], 1, client="127.0.0.1") is ACCEPT


@pytest.mark.parametrize("reason", ["timeout", "servfail"])
def test_a_failed_lookup_never_counts_as_listed(reason: str) -> None:
    answers = {"bl.vipd.test": TimeoutFacts(reason), "bl2.vipd.test": TimeoutFacts(reason)}
    zones = [BL, Zone("bl2.vipd.test")]
    assert interpret(answers, zones, 1, client="127.0.0.2") is ACCEPT
    assert failures(answers) == ["bl.vipd.test", "bl2.vipd.test"]


def test_weights_reach_the_threshold() -> None:
    bl2 = Zone("bl2.vipd.test", weight=2, accept=("127.0.0.4",))
    zones = [BL, bl2]
    only_bl = {"bl.vipd.test": LISTED, "bl2.vipd.test": None}
    both = {"bl.vipd.test": LISTED, "bl2.vipd.test": ListingFacts(("127.0.0.4",))}
    assert score(only_bl, zones) == 1 and score(both, zones) == 3
    assert interpret(only_bl, zones, 2, client="127.0.0.2") is ACCEPT
    assert interpret(both, zones, 3, client="127.0.0.2").kind == "reject"
    assert interpret(both, zones, 4, client="127.0.0.2") is ACCEPT


def test_an_answer_the_filter_ignores_does_not_count() -> None:
    strict = Zone("bl2.vipd.test", weight=5, accept=("127.0.0.2-127.0.0.3",))
    answers = {"bl2.vipd.test": ListingFacts(("127.0.0.4",))}
    assert hits(answers, [strict]) == []
    assert interpret(answers, [strict], 1, client="127.0.0.3") is ACCEPT


def test_negative_weight_offsets_and_is_never_named() -> None:
    allow = Zone("list.dnswl.example", weight=-2)
    block = Zone("bl.vipd.test", weight=3)
    answers = {"list.dnswl.example": ListingFacts(("127.0.10.1",), "allowed"), "bl.vipd.test": LISTED}
    assert score(answers, [allow, block]) == 1
    assert interpret(answers, [allow, block], 2, client="127.0.0.2") is ACCEPT
    verdict = interpret(answers, [allow, block], 1, client="127.0.0.2")
    assert "bl.vipd.test" in verdict.reply.text and "dnswl" not in verdict.reply.text


def test_the_first_listed_zone_in_configuration_order_is_named() -> None:
    zones = [Zone("b.example"), Zone("a.example")]
    answers = {"a.example": ListingFacts(("127.0.0.2",), "A"), "b.example": ListingFacts(("127.0.0.2",), "B")}
    assert interpret(answers, zones, 2, client="192.0.2.1").reply.text.endswith("b.example; B")


def test_answers_for_zones_not_configured_are_ignored() -> None:
    assert interpret({"other.example": LISTED}, [BL], 1, client="127.0.0.2") is ACCEPT


def test_threshold_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        interpret({}, [BL], 0, client="127.0.0.2")


def test_custom_template_fields() -> None:
    verdict = interpret({"bl.vipd.test": LISTED}, [BL], 1, "$client is on $zone ($txt) $$5",
                        client="::ffff:127.0.0.2")
    assert verdict.reply.text == "127.0.0.2 is on bl.vipd.test (RFC5782 test point: listed) $5"


def test_template_check() -> None:
    check_template(DEFAULT_TEMPLATE)
    check_template("blocked: $zone ${txt}")
    with pytest.raises(ValueError, match="unknown"):
        check_template("blocked by $rbl_domain")
    with pytest.raises(ValueError):
        check_template("costs 5$")


def test_hostile_txt_cannot_add_reply_lines() -> None:
    txt = "listed\r\n250 2.0.0 Ok\x00\x1b[31m" + "é" * 10 + "x" * 1000
    verdict = interpret({"bl.vipd.test": ListingFacts(("127.0.0.2",), txt)}, [BL], client="127.0.0.2")
    wire = verdict.reply.to_bytes()
    assert wire.count(b"\r\n") == 1 and wire.startswith(b"554 5.7.1 ")
    assert b"\x00" not in wire and b"\x1b" not in wire
    assert len(wire) < 400


@given(st.text(max_size=300))
def test_any_txt_gives_one_printable_reply_line(txt: str) -> None:
    verdict = interpret({"bl.vipd.test": ListingFacts(("127.0.0.2",), txt)}, [BL], client="127.0.0.2")
    wire = verdict.reply.to_bytes()
    assert wire.endswith(b"\r\n") and wire.count(b"\n") == 1 and b"\r" not in wire[:-2]
    assert all(0x20 <= b < 0x7F for b in wire[:-2])
