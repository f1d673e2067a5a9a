"""vipd.proxy: PROXY protocol v1/v2 round trips, the spec's examples, each refusal, and arbitrary bytes."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from vipd.proxy import ProxyError, ProxyInfo, build_v1, build_v2, parse_proxy

SIG2 = b"\r\n\r\n\x00\r\nQUIT\n"


def crc32c(data: bytes) -> int:
    """Bit by bit from RFC 4960 appendix B (reflected 0x1EDC6F41), apart from the module's table version."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    return SIG2 + bytes((ver_cmd, fam)) + struct.pack("!H", len(body) if length is None else length) + body


def v4_block(src="192.0.2.1", dst="198.51.100.2", sport=51544, dport=25) -> bytes:
    return (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack("!HH", sport, dport))


def with_crc(header: bytes, value: bytes | None = None) -> bytes:
    """``header`` (a v2 header ending in a zeroed 4-byte CRC32c TLV) with the checksum filled in."""
    assert header[-7:] == b"\x03\x00\x04\x00\x00\x00\x00"
    return header[:-4] + (value if value is not None else crc32c(header).to_bytes(4, "big"))


def parsed(data: bytes, **kw) -> ProxyInfo:
    result = parse_proxy(data, **kw)
    assert result is not None
    info, used = result
    assert used == len(data)
    return info


def refused(data: bytes, match: str, **kw) -> None:
    with pytest.raises(ProxyError, match=match):
        parse_proxy(data, **kw)


# --- strategies ----------------------------------------------------------------------------
ports = st.integers(0, 65535)
v4_endpoints = st.tuples(st.ip_addresses(v=4).map(str), ports)
v6_endpoints = st.tuples(st.ip_addresses(v=6).map(str), ports)
pairs = st.one_of(st.tuples(v4_endpoints, v4_endpoints), st.tuples(v6_endpoints, v6_endpoints))
tlv_lists = st.lists(st.tuples(st.integers(0, 255).filter(lambda t: t != 0x03), st.binary(max_size=40)),
                     max_size=4)


@st.composite
def valid_headers(draw) -> bytes:
    kind = draw(st.sampled_from(["v1", "v1-unknown", "v2", "v2-local", "v2-unix", "v2-crc"]))
    if kind == "v1":
        return build_v1(*draw(pairs))
    if kind == "v1-unknown":
        tail = draw(st.binary(max_size=91).filter(lambda b: b"\r" not in b and b"\n" not in b))
        return b"PROXY UNKNOWN" + (b" " + tail if draw(st.booleans()) else b"") + b"\r\n"
    if kind == "v2":
        return build_v2(*draw(pairs), draw(tlv_lists))
    if kind == "v2-local":
        return build_v2(None, None, draw(tlv_lists))
    if kind == "v2-unix":
        return v2(0x21, 0x31, draw(st.binary(min_size=216, max_size=216)))
    return with_crc(build_v2(*draw(pairs), [*draw(tlv_lists), (0x03, bytes(4))]))


def canonical(endpoint: tuple[str, int]) -> tuple[str, int]:
    return str(ipaddress.ip_address(endpoint[0])), endpoint[1]


# --- round trips ---------------------------------------------------------------------------
@given(pairs)
def test_v1_round_trip(pair):
    src, dst = pair
    family = "tcp4" if ":" not in src[0] else "tcp6"
    assert parsed(build_v1(src, dst)) == ProxyInfo(1, "proxy", family, canonical(src), canonical(dst))


@given(pairs, tlv_lists)
def test_v2_round_trip(pair, tlvs):
    src, dst = pair
    family = "tcp4" if ":" not in src[0] else "tcp6"
    info = parsed(build_v2(src, dst, tlvs))
    assert info == ProxyInfo(2, "proxy", family, canonical(src), canonical(dst), tuple(tlvs))


@given(tlv_lists)
def test_v2_local_round_trip(tlvs):
    header = build_v2(None, None, tlvs)
    assert header[12:14] == b"\x20\x00"                     # LOCAL, AF_UNSPEC
    assert parsed(header) == ProxyInfo(2, "local", "unspec", None, None, tuple(tlvs))


@given(pairs, tlv_lists)
def test_v2_crc32c_round_trip(pair, tlvs):
    header = with_crc(build_v2(*pair, [*tlvs, (0x03, bytes(4))]))
    assert parsed(header).tlvs[-1] == (0x03, header[-4:])


def test_ipv4_mapped_ipv6_stays_ipv6():
    mapped = ("::ffff:192.0.2.1", 25)
    text = str(ipaddress.IPv6Address("::ffff:192.0.2.1"))
    line = build_v1(mapped, ("::1", 2525))
    assert line.startswith(b"PROXY TCP6 ")
    assert parsed(line).source == (text, 25)
    assert parsed(b"PROXY TCP6 ::ffff:192.0.2.1 ::1 25 2525\r\n").family == "tcp6"
    info = parsed(build_v2(mapped, ("::1", 2525)))
    assert (info.family, info.source) == ("tcp6", (text, 25))


def test_addresses_come_back_canonical():
    info = parsed(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 2001:0db8::0002 1 2\r\n")
    assert info.source == ("2001:db8::1", 1) and info.destination == ("2001:db8::2", 2)


def test_bytearray_input():
    header = bytearray(build_v2(("192.0.2.1", 1), ("192.0.2.2", 2)))
    assert parse_proxy(header) == parse_proxy(bytes(header))


# --- the spec's examples (doc/proxy-protocol.txt, sections 2.1 and 2.2) ---------------------
def test_spec_v1_example_before_http():
    data = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    info, used = parse_proxy(data)
    assert info == ProxyInfo(1, "proxy", "tcp4", ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert data[used:] == b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"


FFFF6 = ":".join(["ffff"] * 8)


@pytest.mark.parametrize("line, size, info", [
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", 56,
     ProxyInfo(1, "proxy", "tcp4", ("255.255.255.255", 65535), ("255.255.255.255", 65535))),
    (f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode(), 104,
     ProxyInfo(1, "proxy", "tcp6", (FFFF6, 65535), (FFFF6, 65535))),
    (b"PROXY UNKNOWN\r\n", 15, ProxyInfo(1, "local", "unspec", None, None)),
    (f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode(), 107, ProxyInfo(1, "local", "unspec", None, None)),
])
def test_spec_v1_longest_lines(line, size, info):
    assert len(line) == size
    assert parsed(line) == info


def test_v1_unknown_ignores_anything_before_crlf():
    assert parsed(b"PROXY UNKNOWN whatever \x00\xff  TCP9 x\r\n").command == "local"


def test_spec_v2_tcp4():
    info = parsed(v2(0x21, 0x11, v4_block()))
    assert info == ProxyInfo(2, "proxy", "tcp4", ("192.0.2.1", 51544), ("198.51.100.2", 25))


def test_spec_v2_tcp6():
    block = (ipaddress.IPv6Address("2001:db8::1").packed + ipaddress.IPv6Address("2001:db8::25").packed
             + struct.pack("!HH", 40000, 25))
    info = parsed(v2(0x21, 0x21, block))
    assert info == ProxyInfo(2, "proxy", "tcp6", ("2001:db8::1", 40000), ("2001:db8::25", 25))


def test_spec_v2_local_minimal():
    assert parsed(SIG2 + b"\x20\x00\x00\x00") == ProxyInfo(2, "local", "unspec", None, None)


def test_v2_local_ignores_family_and_skips_by_length():
    """Section 2.2: LOCAL discards the block "including the family", and the length must be honoured."""
    assert parsed(v2(0x20, 0x11, b"")) == ProxyInfo(2, "local", "unspec", None, None)
    assert parsed(v2(0x20, 0x11, b"\x01\x02\x03")) == ProxyInfo(2, "local", "unspec", None, None)
    info = parsed(v2(0x20, 0x11, v4_block() + b"\x05\x00\x02id"))
    assert info == ProxyInfo(2, "local", "unspec", None, None, ((0x05, b"id"),))


@pytest.mark.parametrize("fam", [0x31, 0x32])
def test_v2_unix_is_accepted_without_addresses(fam):
    path = b"/run/client.sock".ljust(108, b"\x00")
    info = parsed(v2(0x21, fam, path + path + b"\x04\x00\x00"))
    assert info == ProxyInfo(2, "proxy", "unix", None, None, ((0x04, b""),))


@pytest.mark.parametrize("fam, block", [(0x00, b""), (0x12, v4_block()),
                                        (0x22, bytes(36))])
def test_v2_unspec_and_udp_fall_back_to_unspec(fam, block):
    """Section 2.2: a receiver may fall back to UNSPEC for valid combinations it does not serve."""
    assert parsed(v2(0x21, fam, block)) == ProxyInfo(2, "proxy", "unspec", None, None)


def test_v2_tlvs_are_kept_raw_and_in_order():
    ssl = b"\x01" + bytes(4) + b"\x21\x00\x07TLSv1.3"
    tlvs = ((0x01, b"smtp"), (0x02, b"mx.example"), (0x20, ssl), (0x04, b""), (0xE0, b"\x00" * 300))
    assert parsed(build_v2(("192.0.2.1", 1), ("192.0.2.2", 25), tlvs)).tlvs == tlvs


# --- consumed count, truncation, arbitrary bytes -------------------------------------------
@given(valid_headers(), st.binary(max_size=40))
@example(b"PROXY UNKNOWN\r\n", b"\n")
@example(SIG2 + b"\x20\x00\x00\x00", SIG2)
def test_consumed_is_exact_and_every_prefix_needs_more(header, extra):
    for cut in range(len(header)):
        assert parse_proxy(header[:cut]) is None, cut
    info, used = parse_proxy(header + extra)
    assert used == len(header)
    assert parse_proxy(header) == (info, used)


def check_outcome(data: bytes, **kw) -> None:
    try:
        result = parse_proxy(data, **kw)
    except ProxyError as exc:
        assert str(exc)
        return
    if result is not None:
        info, used = result
        assert isinstance(info, ProxyInfo)
        assert 0 < used <= len(data)
        assert used <= 107 if info.version == 1 else used >= 16


noise = st.binary(max_size=300)
near_misses = st.one_of(
    noise,
    noise.map(lambda b: b"PROXY " + b),
    st.tuples(st.sampled_from([b"TCP4 ", b"TCP6 ", b"UNKNOWN"]), st.lists(st.sampled_from(
        [b" ", b"1", b"0", b".", b":", b"f", b"\r", b"\n", b"\r\n", b"255", b"65535", b"::1"]), max_size=30))
    .map(lambda t: b"PROXY " + t[0] + b"".join(t[1])),
    noise.map(lambda b: SIG2 + b),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 300), noise)
    .map(lambda t: v2(t[0], t[1], t[3], t[2])),
)


@given(near_misses, st.booleans(), st.booleans(), st.integers(16, 600))
def test_arbitrary_bytes_raise_only_proxy_error(data, allow_v1, allow_v2, max_v2_bytes):
    if allow_v1 or allow_v2:
        check_outcome(data, allow_v1=allow_v1, allow_v2=allow_v2, max_v2_bytes=max_v2_bytes)


@given(valid_headers(), st.data())
def test_mutated_headers_raise_only_proxy_error(header, data):
    at = data.draw(st.integers(0, len(header) - 1))
    check_outcome(header[:at] + bytes((data.draw(st.integers(0, 255)),)) + header[at + 1:])


# --- signatures ----------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"", b"P", b"PRO", b"PROXY", b"PROXY ", b"\r", b"\r\n\r\n\x00", SIG2])
def test_signature_prefixes_need_more(data):
    assert parse_proxy(data) is None


@pytest.mark.parametrize("data", [b"E", b"EHLO", b"EHLO mx.example\r\n", b"HELO", b"QUIT\r\n", b"\x16\x03\x01",
                                  b"PROXX", b"proxy ", b"PROXY\r\n", b"\r\n\r\n\x01", b"\r\n\r\n\x00\r\nQUIX"])
def test_no_signature_is_refused_at_once(data):
    refused(data, "not a PROXY protocol header")


def test_versions_can_be_turned_off():
    line, binary = build_v1(("192.0.2.1", 1), ("192.0.2.2", 2)), build_v2(None, None)
    refused(line, "version 1 header, which this listener does not accept", allow_v1=False)
    refused(binary, "version 2 header, which this listener does not accept", allow_v2=False)
    refused(b"PRO", "not a PROXY protocol header", allow_v1=False)
    refused(b"\r\n", "not a PROXY protocol header", allow_v2=False)
    assert parse_proxy(b"PRO", allow_v2=False) is None
    assert parse_proxy(b"\r\n", allow_v1=False) is None
    assert parsed(line, allow_v2=False).version == 1
    assert parsed(binary, allow_v1=False).version == 2
    with pytest.raises(ValueError):
        parse_proxy(b"", allow_v1=False, allow_v2=False)


# --- v1 refusals ---------------------------------------------------------------------------
@pytest.mark.parametrize("data, match", [
    # No CRLF within 107 bytes, complete or not.
    (b"PROXY UNKNOWN " + b"x" * 93, "without CRLF in its first 107 bytes"),
    (f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 655350\r\n".encode(), "without CRLF in its first 107 bytes"),
    # Bare CR or LF.
    (b"PROXY UNKNOWN\n", "bare LF"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", "bare LF"),
    (b"PROXY UNKNOWN\rx", "CR not followed by LF"),
    (b"PROXY UNKNOWN a\rb\r\n", "CR not followed by LF"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\r\n", "CR not followed by LF"),
    # Protocol.
    (b"PROXY TCP5", "protocol b'TCP5'"),
    (b"PROXY tcp4 ", "protocol b'tcp4'"),
    (b"PROXY UDP4 ", "protocol b'U"),
    (b"PROXY UNKNOWNX\r\n", "protocol b'UNKNOWNX'"),
    (b"PROXY \r\n", "protocol b''"),
    (b"PROXY  TCP4", "protocol b''"),
    (b"PROXY TCP4\r\n", "needs exactly"),
    # Fields: count and spacing.
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n", "needs exactly"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3", "needs exactly"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n", "needs exactly"),
    (b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n", "needs exactly"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1  2\r\n", "needs exactly"),
    (b"PROXY TCP4  192.0.2.1", "address b''"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2  2", "port b''"),
    (b"PROXY TCP4 192.0.2.1\t192.0.2.2 1 2\r\n", "needs exactly"),
    (b"PROXY TCP4 192.0.2.1\t", "address"),
    # Addresses.
    (b"PROXY TCP4 192.168.000.1 192.0.2.2 1 2\r\n", r"address b'192\.168\.000\.1'"),
    (b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n", "address"),
    (b"PROXY TCP4 256.0.0.1 192.0.2.2 1 2\r\n", "address"),
    (b"PROXY TCP4 192.0.2 192.0.2.2 1 2\r\n", "address"),
    (b"PROXY TCP4 192.0.2.1.5 192.0.2.2 1 2\r\n", "address"),
    (b"PROXY TCP4 1234567890123456", "address"),
    (b"PROXY TCP4 ::1 ::1 1 2\r\n", "TCP4 address b'::1'"),
    (b"PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n", "TCP6 address b'192.0.2.1'"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "TCP6 address"),
    (b"PROXY TCP6 ::1 1:2:3:4:5:6:7:8:9 1 2\r\n", "TCP6 address"),
    (b"PROXY TCP6 ::g", "TCP6 address"),
    # Ports: decimal 0..65535, no leading zeros.
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 25\r\n", "port b'65536'"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 025 25\r\n", "port b'025'"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 00 25\r\n", "port b'00'"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 -2\r\n", "port b'-2'"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 +2\r\n", "port"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 0x19\r\n", "port"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 \xd9\xa1\r\n", "port"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 100000", "port"),
])
def test_v1_refusals(data, match):
    refused(data, match)


def test_v1_refusals_come_as_soon_as_the_bytes_rule_a_header_out():
    for data in [b"PROXY X", b"PROXY TCP4 1.2.3.4 x", b"PROXY TCP4 1.2.3.4 5.6.7.8 01", b"PROXY TCP4 1.2.3.4 5.6.7.8 99999",
                 b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r", b"PROXY UNKNOWN\r\r"]:
        with pytest.raises(ProxyError):
            parse_proxy(data)


def test_v1_port_zero_and_extremes():
    info = parsed(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n")
    assert info.source == ("0.0.0.0", 0) and info.destination == ("255.255.255.255", 65535)


# --- v2 refusals ---------------------------------------------------------------------------
@pytest.mark.parametrize("data, match", [
    (SIG2 + b"\x11", "version nibble is 1"),
    (SIG2 + b"\x31\x11\x00\x0c", "version nibble is 3"),
    (SIG2 + b"\x01", "version nibble is 0"),
    (SIG2 + b"\x22", "command 0x2"),
    (SIG2 + b"\x2f\x11", "command 0xf"),
    (SIG2 + b"\x21\x13", "byte 0x13"),
    (SIG2 + b"\x21\x10\x00\x00", "byte 0x10"),
    (SIG2 + b"\x21\x01", "byte 0x01"),
    (SIG2 + b"\x21\x41", "byte 0x41"),
    (SIG2 + b"\x20\x23", "byte 0x23"),              # LOCAL ignores the family, but not an undefined one
    (v2(0x21, 0x11, bytes(11)), "too short for the 12-byte address block"),
    (v2(0x21, 0x21, bytes(12)), "too short for the 36-byte address block"),
    (v2(0x21, 0x31, bytes(215)), "too short for the 216-byte address block"),
    (v2(0x21, 0x11, b"", length=11), "too short"),
    (v2(0x21, 0x11, v4_block() + b"\x05"), "TLV header at offset 28 overruns"),
    (v2(0x21, 0x11, v4_block() + b"\x05\x00"), "TLV header at offset 28 overruns"),
    (v2(0x21, 0x11, v4_block() + b"\x05\x00\x05abcd"), "TLV of type 0x05 and 5 bytes overruns"),
    (v2(0x20, 0x00, b"\x04\x00\x00\x05\xff\xff"), "TLV of type 0x05 and 65535 bytes overruns"),
    (v2(0x21, 0x11, v4_block() + b"\x03\x00\x03abc"), "CRC32c TLV has 3 bytes, not 4"),
    (v2(0x21, 0x11, v4_block() + b"\x03\x00\x00"), "CRC32c TLV has 0 bytes"),
])
def test_v2_refusals(data, match):
    refused(data, match)


def test_v2_length_over_the_limit_is_refused_before_the_body_arrives():
    refused(v2(0x21, 0x11, b"", length=4096 - 16 + 1), "4097 bytes is over the limit of 4096")
    assert parse_proxy(v2(0x21, 0x11, b"", length=4096 - 16)) is None
    refused(v2(0x21, 0x11, b"", length=100), "116 bytes is over the limit of 100", max_v2_bytes=100)
    assert parsed(v2(0x21, 0x11, v4_block() + bytes(3)), max_v2_bytes=31).tlvs == ((0, b""),)
    refused(v2(0x21, 0x11, v4_block() + bytes(3)), "over the limit of 30", max_v2_bytes=30)


def test_v2_tlv_overrun_is_refused_before_the_body_arrives():
    """The TLV header is enough: a value running past the declared length is refused at once."""
    header = v2(0x21, 0x11, v4_block() + b"\x05\x00\x40", length=12 + 3 + 10)
    refused(header, "overruns")


def test_v2_crc32c_mismatch():
    good = with_crc(build_v2(("192.0.2.1", 1), ("192.0.2.2", 25), [(0x05, b"id"), (0x03, bytes(4))]))
    assert parsed(good).tlvs[0] == (0x05, b"id")
    bad = with_crc(good[:-4] + bytes(4), (int.from_bytes(good[-4:], "big") ^ 1).to_bytes(4, "big"))
    refused(bad, "does not match its CRC32c")
    flipped = good[:20] + bytes((good[20] ^ 0x01,)) + good[21:]     # the checksum guards the addresses
    refused(flipped, "does not match its CRC32c")


def test_v2_crc32c_over_a_local_header():
    header = with_crc(build_v2(None, None, [(0x03, bytes(4))]))
    assert parsed(header).command == "local"
    refused(header[:-1] + bytes((header[-1] ^ 0x80,)), "CRC32c")


def test_crc32c_reference_value():
    # RFC 3720 B.4 / the usual check value of CRC-32C.
    assert crc32c(b"123456789") == 0xE3069283


# --- builders ------------------------------------------------------------------------------
def test_build_v1_bytes():
    assert build_v1(("192.0.2.1", 51544), ("198.51.100.2", 25)) == b"PROXY TCP4 192.0.2.1 198.51.100.2 51544 25\r\n"
    assert build_v1(("2001:DB8::1", 0), ("2001:db8:0::2", 65535)) == b"PROXY TCP6 2001:db8::1 2001:db8::2 0 65535\r\n"


def test_build_v2_bytes():
    assert build_v2(("192.0.2.1", 51544), ("198.51.100.2", 25)) == v2(0x21, 0x11, v4_block())
    assert build_v2(None, None) == SIG2 + b"\x20\x00\x00\x00"
    assert build_v2(None, None, [(0x04, b"ab")]) == SIG2 + b"\x20\x00\x00\x05\x04\x00\x02ab"


@pytest.mark.parametrize("build", [build_v1, build_v2])
@pytest.mark.parametrize("src, dst", [
    (("192.0.2.1", 1), ("::1", 2)),
    (("192.0.2.1", -1), ("192.0.2.2", 2)),
    (("192.0.2.1", 65536), ("192.0.2.2", 2)),
    (("192.0.2.1", True), ("192.0.2.2", 2)),
    (("192.0.2.1", "25"), ("192.0.2.2", 2)),
    (("mx.example", 25), ("192.0.2.2", 2)),
    (("fe80::1%eth0", 25), ("::1", 2)),
])
def test_builders_refuse_bad_endpoints(build, src, dst):
    with pytest.raises(ValueError):
        build(src, dst)


def test_build_v2_refusals():
    with pytest.raises(ValueError):
        build_v2(("192.0.2.1", 1), None)
    with pytest.raises(ValueError):
        build_v2(None, ("192.0.2.1", 1))
    with pytest.raises(ValueError):
        build_v2(None, None, [(256, b"")])
    with pytest.raises(ValueError):
        build_v2(None, None, [(1, bytes(0x10000))])
    with pytest.raises(ValueError):
        build_v2(("192.0.2.1", 1), ("192.0.2.2", 2), [(1, bytes(0xFFFF - 12 - 3 + 1))])
    assert len(build_v2(None, None, [(1, bytes(0xFFFF - 3))])) == 16 + 0xFFFF
    with pytest.raises(TypeError):
        build_v1((1, 25), ("192.0.2.2", 2))
