"""A small authoritative DNS server on loopback for ``vipd lab``: fixed records, never forwarding.

The lab's early checks (DNSBL, sender and HELO domains) need a nameserver that knows the lab's
names; a fresh machine may have no dnsmasq and no outside DNS, so vipd carries its own.
:class:`LabDns` answers from a mapping of records for the zones it is authoritative for and refuses
everything else. :meth:`LabDns.answer` is pure (wire in, wire out); :meth:`LabDns.start` serves it
over UDP and TCP on the caller's event loop. :func:`dnsbl_records` builds a DNSBL zone's records
(RFC 5782).

Answers:

- the records for (name, type), authoritative (AA); NOERROR with no data when the name exists
  without that type (also for names that exist only as the parent of a held name, RFC 8020);
  NXDOMAIN for other names inside the zones, both with the zone's SOA in the authority section
  (RFC 2308); a CNAME is followed inside the data.
- REFUSED for names outside the zones, other classes than IN, and zone transfers; NOTIMP for other
  opcodes than QUERY and for other meta types than ANY; FORMERR for a message it cannot parse;
  NOTAUTH for a signed one (it holds no keys); nothing for a message too short to hold an id, or
  one that is itself a response.
- Over UDP an answer longer than 512 bytes (or the query's EDNS payload size, up to ours) is sent
  empty with TC set, so the client asks again over TCP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Mapping, Sequence
from typing import Self

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["DEFAULT_REASON", "TEST_POINT_TXT", "LabDns", "Records", "dnsbl_records"]

Records = Mapping[str, Mapping[str, Sequence[str]]]
"""``{name: {rdtype: [rdata, ...]}}`` in zone-file text: ``{"a.lab.test": {"MX": ["10 mx.lab.test"]}}``."""

DEFAULT_REASON = "listed in the vipd lab DNSBL"
TEST_POINT_TXT = "RFC5782 test point: listed"

_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000
_RD = 0x0100
_OPCODE_MASK = 0x7800
_CLASSIC_UDP = 512
# The DNS flag day 2020 size: what we advertise, and the most we send over UDP whatever the client
# offers, so an answer is never fragmented.
_OUR_PAYLOAD = 1232
# A query is a name and a few options; anything much bigger is not a query worth reading.
_MAX_QUERY = 4096
_MAX_CHAIN = 8
_TRANSFERS = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR})


def _header_only(wire: bytes, rcode: int) -> bytes | None:
    """A reply echoing the query's id, opcode and RD, with no sections: for what cannot be parsed."""
    if len(wire) < _HEADER.size:
        return None             # not even an id: nobody to answer
    ident, flags = struct.unpack_from("!HH", wire)
    return _HEADER.pack(ident, _QR | (flags & (_OPCODE_MASK | _RD)) | rcode, 0, 0, 0, 0)


def _canonical(name: str | dns.name.Name) -> dns.name.Name:
    if isinstance(name, str):
        name = dns.name.from_text(name, origin=dns.name.root)
    return name.canonicalize()


def _quoted_txt(text: str) -> str:
    """``text`` as one or more zone-file TXT strings (each at most 255 octets), escaped."""
    data = text.encode("utf-8")
    chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    out = []
    for chunk in chunks:
        escaped = "".join(chr(b) if 0x20 <= b < 0x7f and b not in b'"\\' else f"\\{b:03d}" for b in chunk)
        out.append(f'"{escaped}"')
    return " ".join(out)


def _reversed_part(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # reverse_pointer is "d.c.b.a.in-addr.arpa" or the 32 nibbles ".ip6.arpa": the same reversal
    # RFC 5782 asks for, computed apart from vipd's own query_name so the lab can catch it erring.
    return address.reverse_pointer.rsplit(".", 2)[0]


def dnsbl_records(zone: str, listed: Mapping[str, str], *,
                  reason: str | None = DEFAULT_REASON) -> dict[str, dict[str, list[str]]]:
    """The records of a DNSBL zone listing ``listed`` (client address -> A answer, "127.0.0.2").

    IPv4 addresses by reversed octets, IPv6 ones by reversed nibbles (an IPv4-mapped address stays
    IPv6), each with the A answer and, unless ``reason`` is None, a TXT record holding ``reason``.
    RFC 5782 section 5's test points are always listed (127.0.0.2 and ::ffff:7f00:2, answer
    127.0.0.2 unless ``listed`` says otherwise); 127.0.0.1 must not be, and is refused here.
    """
    zone = zone.strip().lower().rstrip(".")
    entries: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, tuple[str, str | None]] = {
        ipaddress.ip_address("127.0.0.2"): ("127.0.0.2", TEST_POINT_TXT),
        ipaddress.ip_address("::ffff:7f00:2"): ("127.0.0.2", TEST_POINT_TXT),
    }
    for client, code in listed.items():
        address = ipaddress.ip_address(client.strip())
        if address == ipaddress.IPv4Address("127.0.0.1"):
            raise ValueError(f"{zone}: 127.0.0.1 must not be listed (RFC 5782 section 5)")
        entries[address] = (str(ipaddress.IPv4Address(code.strip())), reason)
    records: dict[str, dict[str, list[str]]] = {}
    for address, (code, txt) in entries.items():
        node: dict[str, list[str]] = {"A": [code]}
        if txt is not None:
            node["TXT"] = [_quoted_txt(txt)]
        records[f"{_reversed_part(address)}.{zone}"] = node
    return records


class LabDns:
    """Answers for ``zones`` from ``records``; ``start()`` serves them on loopback.

    ``queries`` counts the queries parsed and answered (whatever the rcode), ``failures`` those that
    hit a bug here (answered SERVFAIL rather than left to kill the server). No wildcards, no DNAME:
    a name is held exactly as given.
    """

    def __init__(self, records: Records, zones: Sequence[str], *, ttl: int = 300,
                 idle_timeout: float = 5.0, max_connections: int = 64) -> None:
        if isinstance(zones, str):
            zones = (zones,)     # a lone string would be iterated character by character
        if not zones:
            raise ValueError("LabDns needs at least one zone")
        self.ttl = ttl
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        # Most specific first, so a name in both bl.vipd.test and vipd.test gets the former's SOA.
        self.zones = tuple(sorted({_canonical(z) for z in zones}, key=len, reverse=True))
        self._nodes: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        for zone in self.zones:
            soa = f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {ttl}"
            self._add(zone, "SOA", [soa])
        for name, by_type in records.items():
            owner = _canonical(name)
            if self._zone_of(owner) is None:
                raise ValueError(f"record {name!r} is outside the zones {', '.join(map(str, self.zones))}")
            for rdtype, rdatas in by_type.items():
                self._add(owner, rdtype, rdatas)
        # Names that exist only because a held name lies below them (0.0.127.bl.vipd.test).
        self._parents: set[dns.name.Name] = set()
        for owner in self._nodes:
            zone = self._zone_of(owner)
            name = owner
            while name != zone:
                name = name.parent()
                self._parents.add(name)
        self.queries = 0
        self.failures = 0
        self.host = ""
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    def _add(self, owner: dns.name.Name, rdtype: str, rdatas: Sequence[str]) -> None:
        if isinstance(rdatas, str):
            rdatas = [rdatas]
        kind = dns.rdatatype.from_text(rdtype)
        # Names inside rdata (an MX's exchange) are absolute, as the mapping has no origin.
        rrset = dns.rrset.from_text_list(owner, self.ttl, dns.rdataclass.IN, kind, list(rdatas),
                                         origin=dns.name.root, relativize=False)
        node = self._nodes.setdefault(owner, {})
        if kind == dns.rdatatype.SOA and kind in node:
            node[kind] = rrset     # the caller's SOA replaces the made-up one
        elif kind in node:
            node[kind].union_update(rrset)
        else:
            node[kind] = rrset

    def _zone_of(self, name: dns.name.Name) -> dns.name.Name | None:
        return next((zone for zone in self.zones if name.is_subdomain(zone)), None)

    @property
    def nameserver(self) -> str:
        """The ``ip:port`` string vipd's ``nameservers`` setting takes (once started)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # --- answers (pure) -------------------------------------------------------------------------

    def answer(self, query_wire: bytes, *, tcp: bool = False) -> bytes | None:
        """The reply to one query message, or None when there is nobody to reply to.

        ``tcp``: no size limit but the 65535 of the length prefix; else the UDP limit, with TC.
        """
        if len(query_wire) < _HEADER.size:
            return None
        flags = struct.unpack_from("!H", query_wire, 2)[0]
        if flags & _QR:
            return None           # a response: answering it could start a loop between servers
        if dns.opcode.from_flags(flags) != dns.opcode.QUERY:
            return _header_only(query_wire, dns.rcode.NOTIMP)
        try:
            query = dns.message.from_wire(query_wire)
        except dns.message.UnknownTSIGKey:
            return _header_only(query_wire, dns.rcode.NOTAUTH)     # RFC 8945 section 5.2.1: no such key
        except Exception:  # noqa: BLE001 - hostile bytes fail in many ways, none ours to raise
            return _header_only(query_wire, dns.rcode.FORMERR)
        self.queries += 1
        try:
            return self._reply(query, tcp)
        except Exception:  # noqa: BLE001 - a bug here must cost one answer, not the server
            self.failures += 1
            return _header_only(query_wire, dns.rcode.SERVFAIL)

    def _reply(self, query: dns.message.Message, tcp: bool) -> bytes:
        if query.edns > 0:
            # RFC 6891 section 6.1.3: only version 0 is known; BADVERS needs an OPT to carry it.
            response = dns.message.make_response(query, our_payload=_OUR_PAYLOAD)
            response.set_rcode(dns.rcode.BADVERS)
            return response.to_wire()
        response = dns.message.make_response(query, our_payload=_OUR_PAYLOAD)
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
        else:
            self._fill(response, query.question[0])
        limit = 65535 if tcp else (max(_CLASSIC_UDP, min(query.payload, _OUR_PAYLOAD))
                                   if query.edns >= 0 else _CLASSIC_UDP)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # RFC 2181 section 9: better no records than a partial set; the client retries on TCP.
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    def _fill(self, response: dns.message.Message, question: dns.rrset.RRset) -> None:
        qname, qtype = question.name.canonicalize(), question.rdtype
        zone = self._zone_of(qname)
        if zone is None or question.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
            response.set_rcode(dns.rcode.REFUSED)      # not ours: a lab server never recurses
            return
        if qtype in _TRANSFERS:
            response.set_rcode(dns.rcode.REFUSED)
            return
        if dns.rdatatype.is_metatype(qtype) and qtype != dns.rdatatype.ANY:
            response.set_rcode(dns.rcode.NOTIMP)
            return
        response.flags |= dns.flags.AA
        name = qname
        for _ in range(_MAX_CHAIN):
            node = self._nodes.get(name)
            if node is None:
                if name not in self._parents:
                    # RFC 6604: the rcode is about the last name of a CNAME chain.
                    response.set_rcode(dns.rcode.NXDOMAIN)
                break
            if qtype == dns.rdatatype.ANY:
                response.answer.extend(node.values())
                return
            if qtype in node:
                response.answer.append(node[qtype])
                return
            cname = node.get(dns.rdatatype.CNAME)
            if cname is None:
                break
            response.answer.append(cname)
            name = cname[0].target.canonicalize()
            zone = self._zone_of(name)
            if zone is None:
                return            # the client's resolver follows it elsewhere
        else:
            return                # a CNAME loop: what was found so far, as a resolver would cut it
        soa = self._nodes[zone][dns.rdatatype.SOA]
        negative = soa.copy()
        negative.update_ttl(min(soa.ttl, soa[0].minimum))    # RFC 2308 section 3
        response.authority.append(negative)

    # --- serving --------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, attempts: int = 5) -> tuple[str, int]:
        """Serve UDP and TCP on ``host`` and one port (any free one for 0); the address bound.

        With port 0 the UDP socket picks the port and TCP takes the same one; if TCP finds it
        taken, both try again on another (``attempts`` times).
        """
        if self._udp is not None:
            raise RuntimeError("LabDns is already started")
        loop = asyncio.get_running_loop()
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=(host, port))
            bound = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound)
            except OSError:
                udp.close()
                if port != 0 or attempt == attempts - 1:
                    raise
                continue
            self._udp = udp
            self.host, self.port = host, bound
            return host, bound
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        """Close both sockets and every open TCP connection."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        tcp, self._tcp = self._tcp, None
        if tcp is not None:
            tcp.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if tcp is not None:
            await tcp.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """RFC 1035 section 4.2.2 / RFC 7766: length-prefixed messages, several per connection."""
        task = asyncio.current_task()
        if len(self._connections) >= self.max_connections or task is None:
            writer.transport.abort()
            return
        self._connections.add(task)
        try:
            while True:
                # One bound for the whole exchange, so a client that neither sends nor reads (its
                # answers fill our buffer) is closed as surely as an idle one.
                async with asyncio.timeout(self.idle_timeout):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    if size > _MAX_QUERY:
                        break
                    reply = self.answer(await reader.readexactly(size), tcp=True)
                    if reply is None:
                        break     # a stream that sends responses is not a client
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            pass
        finally:
            self._connections.discard(task)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()       # close() would wait to flush to a client not reading
            else:
                writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: LabDns) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if len(data) > _MAX_QUERY or self.transport is None:
            return
        reply = self.server.answer(data)
        if reply is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP "port unreachable" from a client that went away: it must not close the socket.
        pass



async def _serve(listen: str, zone: str, listed: Sequence[str], hosts: Mapping[str, str] | None = None) -> None:
    import signal
    host, _, port = listen.rpartition(":")
    records = dnsbl_records(zone, {address: "127.0.0.2" for address in listed})
    for name, address in (hosts or {}).items():
        kind = "A" if ipaddress.ip_address(address).version == 4 else "AAAA"
        records.setdefault(name, {}).setdefault(kind, []).append(address)
    # Each host name is a zone of its own: the server answers for it and for nothing around it.
    dns_server = LabDns(records, [zone, *(hosts or {})])
    await dns_server.start(host.strip("[]"), int(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {dns_server.nameserver} zone={zone} listed={','.join(listed) or '-'}", flush=True)
    await stop.wait()
    await dns_server.stop()


def _host(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        sep = ""
    if not sep or not name.strip(". "):
        import argparse
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=IP")
    return name.strip().lower().rstrip("."), address


def main(argv: list[str] | None = None) -> int:
    """``python -m vipd.labdns``: the lab's DNSBL zone as a process of its own (the lab and the tests
    start it like a backend, and stop it by PID)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m vipd.labdns", description=main.__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT, UDP and TCP (port 0: any free port)")
    parser.add_argument("--zone", default="bl.vipd.test", help="the DNSBL zone")
    parser.add_argument("--listed", action="append", default=[], metavar="IP",
                        help="a client address the zone lists (RFC 5782's test points always are)")
    parser.add_argument("--host", action="append", default=[], type=_host, metavar="NAME=IP",
                        help="also answer NAME with this address (A or AAAA), e.g. a sender's domain")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.listen, args.zone, args.listed, dict(args.host)))
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
