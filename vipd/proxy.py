"""Read and write HAProxy's PROXY protocol header (versions 1 and 2): bytes in, values out, no I/O.

Rules (the spec is HAProxy's doc/proxy-protocol.txt, version 2020/03/05):
- A header is parsed from the whole buffer received so far: ``None`` means "need more bytes" and is
  given for every prefix of a valid header; ``ProxyError`` means "drop the connection" and is raised
  at the first byte that rules a valid header out. Nothing else escapes, whatever the bytes.
- The listener's configuration says which versions it takes; a client that speaks first (``EHLO``)
  is refused at once, never waited on: only a trusted balancer may send a header (spec section 5).
- v1: one line of at most 107 bytes ending in CRLF; a bare CR or LF is refused. Fields are checked
  as they arrive. Addresses in their canonical text, no leading zeros in IPv4 parts or in ports.
  ``UNKNOWN`` (followed by anything up to CRLF) means "use the real connection": command "local".
- v2: the 16-byte fixed part bounds the header (``max_v2_bytes``) before we wait for the rest.
  LOCAL (the balancer's own health checks) ignores the family; only the length says what to skip.
  A valid family we do not serve (UDP) falls back to "unspec", as the spec allows. TLVs are kept raw;
  a CRC32c TLV, if present, must match.
- ``source`` is None whenever the header gives no IP address: the caller uses the socket's own.
- The builders raise ValueError (TypeError) for bad arguments: the caller's bug, not the peer's.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

__all__ = ["ProxyError", "ProxyInfo", "build_v1", "build_v2", "parse_proxy"]

_Family = Literal["tcp4", "tcp6", "unix", "unspec"]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LINE = 107          # bytes including CRLF: the spec's worst case, an UNKNOWN line with two IPv6 addresses
_V2_FIXED = 16

_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
_V4_CHARS = b"0123456789."
_V6_CHARS = b"0123456789abcdefABCDEF:."
_V4_TEXT_MAX = len("255.255.255.255")
_V6_TEXT_MAX = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
# 14th byte -> (family we report, address block length). Every value the spec lists is accepted;
# datagrams fall back to "unspec" (section 2.2 allows that) because an SMTP peer is never on UDP.
_V2_FAMILIES: dict[int, tuple[_Family, int]] = {
    0x00: ("unspec", 0),
    0x11: ("tcp4", 12), 0x12: ("unspec", 12),
    0x21: ("tcp6", 36), 0x22: ("unspec", 36),
    0x31: ("unix", 216), 0x32: ("unix", 216),
}
_TLV_CRC32C = 0x03
_TLV_HEAD = 3


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What a PROXY header says about the connection it precedes."""

    version: int                                        # 1 or 2
    command: Literal["proxy", "local"]                  # "local": v2 LOCAL or v1 UNKNOWN, use the real endpoints
    family: _Family
    source: tuple[str, int] | None                      # the real client's (ip, port); None: no IP address given
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()            # v2 only, raw and in order, the CRC32c one included


class ProxyError(Exception):
    """The bytes are not a PROXY header this listener accepts; the message says why."""


_V1_UNKNOWN = ProxyInfo(1, "local", "unspec", None, None)


def parse_proxy(buf: bytes | bytearray, *, allow_v1: bool = True, allow_v2: bool = True,
                max_v2_bytes: int = 4096) -> tuple[ProxyInfo, int] | None:
    """Parse a PROXY header at the start of ``buf``: (info, bytes consumed), or None if more bytes are needed.

    ``max_v2_bytes`` bounds a whole v2 header (16 fixed bytes included). Raises ProxyError as soon as
    the bytes cannot start a valid header of an allowed version. ``buf`` is not changed.
    """
    if not (allow_v1 or allow_v2):
        raise ValueError("allow_v1 and allow_v2 are both false: no header could ever be accepted")
    version = _version(buf, allow_v1, allow_v2)
    if version is None:
        return None
    return _parse_v1(buf) if version == 1 else _parse_v2(buf, max_v2_bytes)


def build_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The v1 line for a TCP connection from ``source`` to ``destination`` (both IPv4 or both IPv6)."""
    (src, sport), (dst, dport) = _endpoint(source), _endpoint(destination)
    if src.version != dst.version:
        raise ValueError(f"source {src} and destination {dst} are not of the same IP version")
    return f"PROXY TCP{src.version} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def build_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None,
             tlvs: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """The v2 header: PROXY over TCP for two endpoints, or LOCAL (family UNSPEC) for None and None.

    ``tlvs`` go out as given, in order; a CRC32c TLV is the caller's to fill in.
    """
    if (source is None) != (destination is None):
        raise ValueError("source and destination must both be given, or both be None for LOCAL")
    if source is None or destination is None:
        head, block = bytes((0x20 | _V2_LOCAL, 0x00)), b""
    else:
        (src, sport), (dst, dport) = _endpoint(source), _endpoint(destination)
        if src.version != dst.version:
            raise ValueError(f"source {src} and destination {dst} are not of the same IP version")
        head = bytes((0x20 | _V2_PROXY, 0x11 if src.version == 4 else 0x21))
        block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    block += b"".join(_tlv(kind, value) for kind, value in tlvs)
    if len(block) > 0xFFFF:
        raise ValueError(f"v2 header body of {len(block)} bytes does not fit its 16-bit length")
    return V2_SIGNATURE + head + len(block).to_bytes(2, "big") + block


# --- which version ---------------------------------------------------------------------------
def _version(buf: bytes | bytearray, allow_v1: bool, allow_v2: bool) -> int | None:
    head = bytes(buf[: len(V2_SIGNATURE)])
    for version, signature, allowed in ((1, V1_SIGNATURE, allow_v1), (2, V2_SIGNATURE, allow_v2)):
        seen = min(len(head), len(signature))
        if head[:seen] != signature[:seen]:
            continue
        if allowed:
            return version if seen == len(signature) else None
        if seen == len(signature):
            raise ProxyError(f"PROXY protocol version {version} header, which this listener does not accept")
    raise ProxyError(f"not a PROXY protocol header: starts {head!r}")


# --- version 1 -------------------------------------------------------------------------------
def _parse_v1(buf: bytes | bytearray) -> tuple[ProxyInfo, int] | None:
    window = bytes(buf[:V1_MAX_LINE])
    lf = window.find(b"\n")
    if lf < 0:
        if len(window) >= V1_MAX_LINE:
            raise ProxyError(f"PROXY v1 line without CRLF in its first {V1_MAX_LINE} bytes")
        cr = window.find(b"\r")
        if 0 <= cr < len(window) - 1:
            raise ProxyError("PROXY v1 line holds a CR not followed by LF")
        # A trailing CR may still get its LF; the fields before it are then all there is.
        _v1_fields(window[:cr].split(b" ") if cr >= 0 else window.split(b" "), complete=cr >= 0)
        return None
    if window[lf - 1: lf] != b"\r":
        raise ProxyError("PROXY v1 line ends in a bare LF, not CRLF")
    line = window[: lf - 1]
    if b"\r" in line:
        raise ProxyError("PROXY v1 line holds a CR not followed by LF")
    info = _v1_fields(line.split(b" "), complete=True)
    return cast(ProxyInfo, info), lf + 1


def _v1_fields(fields: list[bytes], complete: bool) -> ProxyInfo | None:
    """Check the space-separated fields of a v1 line, "PROXY" first; the last may be unfinished unless ``complete``.

    Returns the info once ``complete``, else None (nothing wrong so far).
    """
    fields = fields[1:]
    proto = fields[0]
    if not complete and len(fields) == 1:
        if not any(name.startswith(proto) for name in _PROTOCOLS):
            raise ProxyError(f"PROXY v1 protocol {proto!r} is not TCP4, TCP6 or UNKNOWN")
        return None
    if proto == b"UNKNOWN":
        # Section 2.1: the receiver must ignore whatever follows UNKNOWN up to the CRLF.
        return _V1_UNKNOWN if complete else None
    if proto not in _PROTOCOLS:
        raise ProxyError(f"PROXY v1 protocol {proto!r} is not TCP4, TCP6 or UNKNOWN")
    rest = fields[1:]
    if len(rest) > 4 or (complete and len(rest) != 4):
        raise ProxyError(f"PROXY v1 {proto.decode()} line needs exactly: source and destination address, "
                         f"source and destination port, each after one space")
    if not complete:
        last = len(rest) - 1
        for i, field in enumerate(rest):
            if i < 2:
                _v1_check_address(field, proto, done=i < last)
            else:
                _v1_check_port(field, done=i < last)
        return None
    src, dst = (_v1_address(field, proto) for field in rest[:2])
    sport, dport = (_v1_port(field) for field in rest[2:])
    family: _Family = "tcp4" if proto == b"TCP4" else "tcp6"
    return ProxyInfo(1, "proxy", family, (src, sport), (dst, dport))


def _v1_check_address(field: bytes, proto: bytes, done: bool) -> None:
    v6 = proto == b"TCP6"
    # A cheap check of every byte first, so that a partial field fails early and ipaddress only ever
    # sees ASCII (it would accept a "%scope" suffix, which has no place on the wire).
    if len(field) > (_V6_TEXT_MAX if v6 else _V4_TEXT_MAX) or field.translate(None, _V6_CHARS if v6 else _V4_CHARS):
        raise ProxyError(f"PROXY v1 {proto.decode()} address {field!r} is malformed")
    if done:
        _v1_address(field, proto)


def _v1_address(field: bytes, proto: bytes) -> str:
    if field.translate(None, _V6_CHARS):
        raise ProxyError(f"PROXY v1 {proto.decode()} address {field!r} is malformed")
    try:
        address = (ipaddress.IPv6Address if proto == b"TCP6" else ipaddress.IPv4Address)(field.decode("ascii"))
    except ValueError:
        raise ProxyError(f"PROXY v1 {proto.decode()} address {field!r} is malformed") from None
    return str(address)


def _v1_check_port(field: bytes, done: bool) -> None:
    bad = ((field and not field.isdigit()) or len(field) > 5 or (len(field) > 1 and field.startswith(b"0"))
           or (field and int(field) > 0xFFFF) or (done and not field))
    if bad:
        raise ProxyError(f"PROXY v1 port {field!r} is not a decimal 0..65535 without leading zeros")


def _v1_port(field: bytes) -> int:
    _v1_check_port(field, done=True)
    return int(field)


# --- version 2 -------------------------------------------------------------------------------
def _parse_v2(buf: bytes | bytearray, max_bytes: int) -> tuple[ProxyInfo, int] | None:
    fixed = bytes(buf[:_V2_FIXED])
    if len(fixed) <= 12:
        return None
    if fixed[12] >> 4 != 2:
        raise ProxyError(f"PROXY v2 version nibble is {fixed[12] >> 4}, not 2")
    command = fixed[12] & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyError(f"PROXY v2 command {command:#x} is neither LOCAL nor PROXY")
    if len(fixed) == 13:
        return None
    if fixed[13] not in _V2_FAMILIES:
        raise ProxyError(f"PROXY v2 address family and transport byte {fixed[13]:#04x} is not one the spec defines")
    family, address_len = _V2_FAMILIES[fixed[13]]
    if len(fixed) < _V2_FIXED:
        return None
    length = int.from_bytes(fixed[14:16], "big")
    total = _V2_FIXED + length
    if total > max_bytes:
        raise ProxyError(f"PROXY v2 header of {total} bytes is over the limit of {max_bytes}")
    if length < address_len:
        if command == _V2_PROXY:
            raise ProxyError(f"PROXY v2 length {length} is too short for the {address_len}-byte address block "
                             f"of family byte {fixed[13]:#04x}")
        # LOCAL ignores the family; the length alone says what to skip, and then no TLV can be found.
        address_len = length
    block = bytes(buf[_V2_FIXED:total])
    spans = _tlv_spans(block, address_len, length)
    if len(block) < length:
        return None
    for kind, start, size in spans:
        if kind == _TLV_CRC32C:
            _check_crc32c(bytes(buf[:total]), _V2_FIXED + start, size)
    tlvs = tuple((kind, block[start: start + size]) for kind, start, size in spans)
    if command == _V2_LOCAL:
        return ProxyInfo(2, "local", "unspec", None, None, tlvs), total
    source = destination = None
    if family in ("tcp4", "tcp6"):
        width = 4 if family == "tcp4" else 16
        sport, dport = struct.unpack_from("!HH", block, 2 * width)
        source = (str(ipaddress.ip_address(block[:width])), sport)
        destination = (str(ipaddress.ip_address(block[width: 2 * width])), dport)
    return ProxyInfo(2, "proxy", family, source, destination, tlvs), total


def _tlv_spans(block: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(type, value offset, value length) of the TLVs in ``block[pos:end]``.

    ``block`` may not have reached ``end`` yet: a TLV whose header has arrived is checked against the
    end of the header already, so an overrun is refused before the rest of it is waited for.
    """
    spans = []
    while pos < end:
        if end - pos < _TLV_HEAD:
            raise ProxyError(f"PROXY v2 TLV header at offset {_V2_FIXED + pos} overruns the header")
        if pos + _TLV_HEAD > len(block):
            break
        size = int.from_bytes(block[pos + 1: pos + 3], "big")
        if pos + _TLV_HEAD + size > end:
            raise ProxyError(f"PROXY v2 TLV of type {block[pos]:#04x} and {size} bytes overruns the header")
        spans.append((block[pos], pos + _TLV_HEAD, size))
        pos += _TLV_HEAD + size
    return spans


def _check_crc32c(header: bytes, at: int, size: int) -> None:
    """Section 2.2.3: the checksum is taken over the whole header with its own field set to zeros."""
    if size != 4:
        raise ProxyError(f"PROXY v2 CRC32c TLV has {size} bytes, not 4")
    expected = int.from_bytes(header[at: at + 4], "big")
    if _crc32c(header[:at] + bytes(4) + header[at + 4:]) != expected:
        raise ProxyError("PROXY v2 header does not match its CRC32c checksum")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli, RFC 4960 appendix B); zlib only has the IEEE polynomial."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- building --------------------------------------------------------------------------------
def _endpoint(pair: tuple[str, int]) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, port = pair
    if not isinstance(host, str):
        raise TypeError(f"address {host!r} is not a string")
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ValueError(f"address {host!r} has a scope, which the PROXY protocol cannot carry")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port!r} is not an integer 0..65535")
    return address, port


def _tlv(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"TLV type {kind!r} is not 0..255")
    if len(value) > 0xFFFF:
        raise ValueError(f"TLV value of {len(value)} bytes does not fit its 16-bit length")
    return bytes((kind,)) + len(value).to_bytes(2, "big") + bytes(value)
