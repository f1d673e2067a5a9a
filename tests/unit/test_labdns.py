"""Tests for vipd.labdns without sockets: LabDns.answer on queries built with dnspython, and the DNSBL
records of dnsbl_records (RFC 5782)."""

from __future__ import annotations

import ipaddress
import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsigkeyring
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vipd.labdns import DEFAULT_REASON, TEST_POINT_TXT, LabDns, dnsbl_records

BL_ZONE = "bl.vipd.test"
LAB_ZONE = "vipd.test"
TTL = 120
# 30 TXT strings of 60 octets: about 1,900 octets of answer, more than 512 and than 1232.
BIG_TXT = [f'"{i:02d}{"x" * 58}"' for i in range(30)]
# About 700 octets: over 512, under 1232.
MEDIUM_TXT = [f'"{i:02d}{"y" * 58}"' for i in range(11)]
RECORDS = {
    **dnsbl_records(BL_ZONE, {"192.0.2.1": "127.0.0.3", "2001:db8::1": "127.0.0.4"}),
    "good.vipd.test": {"A": ["127.0.0.10"], "MX": ["10 mx.good.vipd.test"]},
    "MX.Good.Vipd.Test.": {"A": ["127.0.0.11"]},
    "mx-only.vipd.test": {"MX": ["10 mx.good.vipd.test"]},
    "nullmx.vipd.test": {"MX": ["0 ."]},
    "alias.vipd.test": {"CNAME": ["good.vipd.test"]},
    "dangling.vipd.test": {"CNAME": ["gone.vipd.test"]},
    "away.vipd.test": {"CNAME": ["somewhere.example"]},
    "loop1.vipd.test": {"CNAME": ["loop2.vipd.test"]},
    "loop2.vipd.test": {"CNAME": ["loop1.vipd.test"]},
    "deep.under.vipd.test": {"A": ["127.0.0.12"]},
    "big.vipd.test": {"TXT": BIG_TXT},
    "medium.vipd.test": {"TXT": MEDIUM_TXT},
}
SERVER = LabDns(RECORDS, (BL_ZONE, LAB_ZONE), ttl=TTL)


def ask(name: str, rdtype: str = "A", *, server: LabDns = SERVER, tcp: bool = False,
        **query: object) -> dns.message.Message:
    request = dns.message.make_query(name, rdtype, **query)
    wire = server.answer(request.to_wire(), tcp=tcp)
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert reply.id == request.id and reply.flags & dns.flags.QR
    return reply


def answers(reply: dns.message.Message) -> list[str]:
    return sorted(rdata.to_text() for rrset in reply.answer for rdata in rrset)


def soa_ttl(reply: dns.message.Message, zone: str) -> int:
    (rrset,) = reply.authority
    assert rrset.rdtype == dns.rdatatype.SOA and rrset.name == dns.name.from_text(zone)
    return rrset.ttl


# --- answers ------------------------------------------------------------------------------------

def test_a_record_is_an_authoritative_answer() -> None:
    reply = ask(f"2.0.0.127.{BL_ZONE}")
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
    assert not reply.flags & dns.flags.RA                # it never recurses
    assert answers(reply) == ["127.0.0.2"] and reply.answer[0].ttl == TTL


def test_txt_record() -> None:
    reply = ask(f"2.0.0.127.{BL_ZONE}", "TXT")
    assert answers(reply) == [f'"{TEST_POINT_TXT}"']
    assert ask(f"1.2.0.192.{BL_ZONE}", "TXT").answer[0][0].strings == (DEFAULT_REASON.encode(),)


def test_mx_and_null_mx() -> None:
    assert answers(ask("good.vipd.test", "MX")) == ["10 mx.good.vipd.test."]
    assert answers(ask("nullmx.vipd.test", "MX")) == ["0 ."]


def test_nxdomain_inside_a_zone_carries_the_zones_soa() -> None:
    reply = ask(f"1.0.0.127.{BL_ZONE}")
    assert reply.rcode() == dns.rcode.NXDOMAIN and reply.flags & dns.flags.AA and not reply.answer
    assert soa_ttl(reply, BL_ZONE) == TTL                # the most specific zone's SOA
    assert ask("bad.vipd.test").rcode() == dns.rcode.NXDOMAIN
    assert soa_ttl(ask("bad.vipd.test"), LAB_ZONE) == TTL


def test_nodata_when_the_name_exists_without_the_type() -> None:
    for name, rdtype in [("good.vipd.test", "AAAA"), ("mx-only.vipd.test", "A"), (f"2.0.0.127.{BL_ZONE}", "MX")]:
        reply = ask(name, rdtype)
        assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA, (name, rdtype)
        assert not reply.answer and reply.authority, (name, rdtype)


def test_a_name_above_a_held_name_exists() -> None:
    # RFC 8020: NXDOMAIN would say nothing lies below 0.0.127.bl.vipd.test.
    for name in (f"0.0.127.{BL_ZONE}", f"127.{BL_ZONE}", "under.vipd.test"):
        reply = ask(name)
        assert reply.rcode() == dns.rcode.NOERROR and not reply.answer, name


def test_zone_apex_has_its_soa() -> None:
    for zone in (BL_ZONE, LAB_ZONE):
        reply = ask(zone, "SOA")
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer[0].rdtype == dns.rdatatype.SOA


def test_refused_outside_the_zones() -> None:
    for name in ("example.com", "test", ".", "vipd.test.example", "xvipd.test"):
        reply = ask(name)
        assert reply.rcode() == dns.rcode.REFUSED, name
        assert not reply.flags & dns.flags.AA and not reply.answer and not reply.authority, name


def test_names_are_case_insensitive() -> None:
    reply = ask("2.0.0.127.BL.Vipd.TEST")
    assert reply.rcode() == dns.rcode.NOERROR and answers(reply) == ["127.0.0.2"]
    # The record was given as MX.Good.Vipd.Test.
    assert answers(ask("mx.good.vipd.test")) == ["127.0.0.11"]
    assert answers(ask("MX.GOOD.VIPD.TEST")) == ["127.0.0.11"]


def test_cname_is_followed_inside_the_data() -> None:
    reply = ask("alias.vipd.test")
    assert [r.rdtype for r in reply.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert answers(reply) == ["127.0.0.10", "good.vipd.test."]
    # RFC 6604: the rcode is the chain's last name's.
    dangling = ask("dangling.vipd.test")
    assert dangling.rcode() == dns.rcode.NXDOMAIN and len(dangling.answer) == 1
    away = ask("away.vipd.test")
    assert away.rcode() == dns.rcode.NOERROR and answers(away) == ["somewhere.example."]
    loop = ask("loop1.vipd.test")
    assert loop.rcode() == dns.rcode.NOERROR and 1 <= len(loop.answer) <= 8
    assert answers(ask("alias.vipd.test", "CNAME")) == ["good.vipd.test."]


def test_any_returns_every_record_of_the_name() -> None:
    assert answers(ask("good.vipd.test", "ANY")) == ["10 mx.good.vipd.test.", "127.0.0.10"]


def test_other_classes_and_zone_transfers_are_refused() -> None:
    assert ask("good.vipd.test", "TXT", rdclass=dns.rdataclass.CH).rcode() == dns.rcode.REFUSED
    assert ask(LAB_ZONE, "AXFR").rcode() == dns.rcode.REFUSED
    assert ask(LAB_ZONE, "MAILB").rcode() == dns.rcode.NOTIMP


def test_other_opcodes_are_not_implemented() -> None:
    request = dns.message.make_query("good.vipd.test", "SOA")
    request.set_opcode(dns.opcode.NOTIFY)
    reply = dns.message.from_wire(SERVER.answer(request.to_wire()))
    assert reply.id == request.id and reply.rcode() == dns.rcode.NOTIMP
    assert reply.opcode() == dns.opcode.NOTIFY


def test_two_questions_are_a_format_error() -> None:
    request = dns.message.make_query("good.vipd.test", "A")
    request.question.append(dns.message.make_query("bad.vipd.test", "A").question[0])
    reply = dns.message.from_wire(SERVER.answer(request.to_wire()))
    assert reply.rcode() == dns.rcode.FORMERR


def test_edns_is_echoed_and_unknown_versions_get_badvers() -> None:
    reply = ask("good.vipd.test", use_edns=0, payload=4096)
    assert reply.edns == 0 and answers(reply) == ["127.0.0.10"]
    assert ask("good.vipd.test").edns == -1            # no EDNS asked, none answered
    reply = ask("good.vipd.test", use_edns=1)
    assert reply.edns == 0 and reply.rcode() == dns.rcode.BADVERS and not reply.answer


# --- sizes --------------------------------------------------------------------------------------

def test_udp_answer_over_512_octets_is_truncated() -> None:
    reply = ask("medium.vipd.test", "TXT")
    assert reply.flags & dns.flags.TC and not reply.answer and reply.rcode() == dns.rcode.NOERROR
    assert len(answers(ask("medium.vipd.test", "TXT", tcp=True))) == len(MEDIUM_TXT)


def test_udp_limit_is_the_edns_payload_up_to_ours() -> None:
    medium = ask("medium.vipd.test", "TXT", use_edns=0, payload=1232)
    assert not medium.flags & dns.flags.TC and len(medium.answer[0]) == len(MEDIUM_TXT)
    small = ask("medium.vipd.test", "TXT", use_edns=0, payload=600)
    assert small.flags & dns.flags.TC and not small.answer
    # Asking for less than 512 still allows 512 (RFC 6891 section 6.2.5).
    assert not ask("good.vipd.test", "MX", use_edns=0, payload=100).flags & dns.flags.TC
    big = ask("big.vipd.test", "TXT", use_edns=0, payload=65000)     # more than we send
    assert big.flags & dns.flags.TC and not big.answer and big.edns == 0
    assert len(ask("big.vipd.test", "TXT", tcp=True).answer[0]) == len(BIG_TXT)


# --- what it does not answer, or answers with an error ------------------------------------------

def test_too_short_for_an_id_is_dropped() -> None:
    for wire in (b"", b"\x12", b"\x12\x34" + b"\x00" * 9):
        assert SERVER.answer(wire) is None


def test_responses_are_not_answered() -> None:
    response = dns.message.make_response(dns.message.make_query("good.vipd.test", "A"))
    assert SERVER.answer(response.to_wire()) is None


@pytest.mark.parametrize("wire", [
    b"\xab\xcd" + b"\x01\x00" + b"\x00\x01" + b"\x00" * 6,            # a question that is not there
    b"\xab\xcd\x01\x00" + b"\xff" * 40,
    dns.message.make_query("good.vipd.test", "A").to_wire()[:-3],     # cut short
    dns.message.make_query("good.vipd.test", "A").to_wire() + b"junk",
])
def test_garbage_gets_formerr_with_its_id(wire: bytes) -> None:
    reply = SERVER.answer(wire)
    assert reply is not None
    ident, flags, *counts = struct.unpack("!HHHHHH", reply)
    assert ident == struct.unpack_from("!H", wire)[0] and flags & 0x8000
    assert flags & 0xF == dns.rcode.FORMERR and counts == [0, 0, 0, 0]


def test_signed_query_is_not_authorized() -> None:
    request = dns.message.make_query("good.vipd.test", "A")
    request.use_tsig(dns.tsigkeyring.from_text({"lab.": "MTIzNDU2Nzg5MDEyMzQ1Ng=="}), "lab.")
    reply = dns.message.from_wire(SERVER.answer(request.to_wire()))
    assert reply.rcode() == dns.rcode.NOTAUTH and not reply.answer


@given(st.binary(max_size=600))
def test_random_bytes_never_raise(wire: bytes) -> None:
    failures = SERVER.failures
    reply = SERVER.answer(wire)
    assert SERVER.failures == failures
    if reply is not None:
        assert reply[:2] == wire[:2]
        dns.message.from_wire(reply)


_QUERY = dns.message.make_query(f"2.0.0.127.{BL_ZONE}", "TXT", use_edns=0,
                                options=[dns.edns.GenericOption(10, b"12345678")]).to_wire()


@given(st.lists(st.tuples(st.integers(0, len(_QUERY) - 1), st.integers(0, 255)), max_size=4),
       st.none() | st.integers(0, len(_QUERY)), st.binary(max_size=20) | st.just(b""))
def test_damaged_queries_never_raise(edits: list[tuple[int, int]], cut: int | None, tail: bytes) -> None:
    # Random bytes rarely get past the header; a real query with a few octets changed does.
    wire = bytearray(_QUERY)
    for at, value in edits:
        wire[at] = value
    failures = SERVER.failures
    reply = SERVER.answer(bytes(wire[:cut]) + tail)
    assert SERVER.failures == failures
    if reply is not None:
        dns.message.from_wire(reply)


# --- records ------------------------------------------------------------------------------------

def test_dnsbl_records_names_and_test_points() -> None:
    records = dnsbl_records("BL.Example.", {"192.0.2.1": "127.0.0.3", "2001:db8::1": "127.0.0.4"},
                            reason="see https://bl.example/lookup")
    v6_point = ".".join(reversed(ipaddress.IPv6Address("::ffff:7f00:2").exploded.replace(":", "")))
    assert records["2.0.0.127.bl.example"] == {"A": ["127.0.0.2"], "TXT": [f'"{TEST_POINT_TXT}"']}
    assert records[f"{v6_point}.bl.example"]["A"] == ["127.0.0.2"]
    assert records["1.2.0.192.bl.example"] == {"A": ["127.0.0.3"], "TXT": ['"see https://bl.example/lookup"']}
    # RFC 5782 section 2.4's nibble form.
    assert records["1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example"]["A"] == ["127.0.0.4"]
    assert "1.0.0.127.bl.example" not in records
    assert len(records) == 4


def test_dnsbl_records_agree_with_vipds_query_names() -> None:
    from vipd.policy.dnsbl import query_name
    records = dnsbl_records(BL_ZONE, {"198.51.100.7": "127.0.0.2", "2001:db8::5": "127.0.0.2"})
    for client in ("198.51.100.7", "2001:db8::5", "127.0.0.2"):
        assert query_name(client, BL_ZONE) in records
    assert query_name("::ffff:7f00:2", BL_ZONE, unmap=False) in records


def test_dnsbl_records_options_and_refusals() -> None:
    assert "TXT" not in dnsbl_records(BL_ZONE, {"192.0.2.1": "127.0.0.2"}, reason=None)["1.2.0.192." + BL_ZONE]
    # The test point's answer may be set (a list answering 127.0.0.4 only).
    assert dnsbl_records(BL_ZONE, {"127.0.0.2": "127.0.0.4"})["2.0.0.127." + BL_ZONE]["A"] == ["127.0.0.4"]
    with pytest.raises(ValueError, match="127.0.0.1 must not be listed"):
        dnsbl_records(BL_ZONE, {"127.0.0.1": "127.0.0.2"})
    with pytest.raises(ValueError):
        dnsbl_records(BL_ZONE, {"192.0.2.1": "not an address"})
    with pytest.raises(ValueError):
        dnsbl_records(BL_ZONE, {"192.0.2.1": "2001:db8::1"})     # an A answer is IPv4


@pytest.mark.parametrize("reason", ['say "no" \\ here', "x" * 600, "café", ""])
def test_any_reason_comes_back_as_the_same_text(reason: str) -> None:
    server = LabDns(dnsbl_records(BL_ZONE, {"192.0.2.9": "127.0.0.2"}, reason=reason), [BL_ZONE])
    (rrset,) = ask(f"9.2.0.192.{BL_ZONE}", "TXT", server=server, tcp=True).answer
    assert b"".join(rrset[0].strings).decode() == reason
    assert all(len(s) <= 255 for s in rrset[0].strings)


def test_records_outside_the_zones_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="outside the zones"):
        LabDns({"mail.example.com": {"A": ["127.0.0.1"]}}, [LAB_ZONE])
    with pytest.raises(ValueError):
        LabDns({}, [])


def test_records_of_one_name_and_type_given_twice_are_merged() -> None:
    server = LabDns({"a.vipd.test": {"A": ["127.0.0.1"]}, "A.VIPD.TEST": {"A": ["127.0.0.2"]}}, "vipd.test")
    assert answers(ask("a.vipd.test", server=server)) == ["127.0.0.1", "127.0.0.2"]


def test_a_given_soa_replaces_the_made_up_one() -> None:
    server = LabDns({"vipd.test": {"SOA": ["ns1.vipd.test. admin.vipd.test. 7 1 1 1 30"]}}, ["vipd.test"])
    reply = ask("nothing.vipd.test", server=server)
    assert reply.authority[0][0].serial == 7 and reply.authority[0].ttl == 30   # min(TTL, MINIMUM)


def test_counters() -> None:
    server = LabDns(RECORDS, (BL_ZONE, LAB_ZONE))
    ask("good.vipd.test", server=server)
    ask("example.com", server=server)
    server.answer(b"\x00\x01garbage-here")
    assert (server.queries, server.failures) == (2, 0)
