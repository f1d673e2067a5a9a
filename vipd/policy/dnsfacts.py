"""Gather the DNS facts the policy checks decide on: the only module of vipd.policy that does I/O.

``DnsFacts`` asks the configured nameservers (vipd's ``nameservers``: "ip" or "ip:port", never the
system's resolv.conf) for DNSBL listings and for a domain's A, AAAA and MX records, and turns every
outcome into a fact value (:class:`~vipd.policy.dnsbl.ListingFacts`,
:class:`~vipd.policy.dnsbl.TimeoutFacts`, :class:`~vipd.policy.sender.DomainFacts`); it never raises
for a DNS problem. The fact types live with the pure checks that read them, so those modules do not
import dnspython; they are re-exported here.

Rules:

- Each lookup is bounded by ``timeout`` (default 2 s) in all, whatever the number of nameservers
  (each gets an equal share before the next is tried); a whole :meth:`DnsFacts.dnsbl` call by
  ``timeout`` too, the TXT lookups getting what the A lookups left.
- Answers are cached for their TTL (capped at ``max_ttl``) on the monotonic clock; NXDOMAIN and
  empty answers for the SOA's negative TTL (RFC 2308 section 5: the lesser of the SOA record's TTL
  and its MINIMUM) or ``negative_ttl`` when the answer has no SOA. Timeouts and failures are not
  cached: the next client tries again.
- Concurrent lookups of the same name and type share one query.
- ``observe(label, seconds)`` is called once per query sent (not for cache hits) with the zone name,
  or "domain" for domain lookups (never the domain: that label set would be unbounded).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .dnsbl import ListingFacts, TimeoutFacts, Zone, ZoneAnswer, query_name
from .sender import DomainFacts, DomainStatus

__all__ = [
    "DnsFacts",
    "Observer",
    "parse_nameserver",
    "DomainFacts",
    "ListingFacts",
    "TimeoutFacts",
    "ZoneAnswer",
]

Observer = Callable[[str, float], None]
Kind = Literal["ok", "nxdomain", "nodata", "timeout", "servfail"]
DOMAIN_LABEL = "domain"
_MIN_TXT_BUDGET = 0.05     # seconds: below this a TXT query could not come back in time anyway


@dataclass(frozen=True, slots=True)
class _Result:
    """One query's outcome; ``records`` as text (addresses, MX exchanges by preference, TXT)."""

    kind: Kind
    records: tuple[str, ...] = ()


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"::1"`` or ``"[::1]:5353"`` as (address, port).

    Only addresses: a nameserver given by name would itself need a resolver to find.
    """
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad nameserver {text!r}: expected [address]:port")
        port = rest[1:] if rest else "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, "53"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad nameserver {text!r}: not an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad nameserver {text!r}: bad port")
    return host, int(port)


def _negative_ttl(response: dns.message.Message | None, default: float) -> float:
    """RFC 2308 section 5: min(SOA TTL, SOA MINIMUM) from the authority section, else ``default``."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return default


def _positive_ttl(answer: dns.resolver.Answer) -> float:
    # Through a CNAME chain the answer is good only as long as the shortest-lived link.
    chaining = getattr(answer, "chaining_result", None)
    if chaining is not None:
        return float(chaining.minimum_ttl)
    return float(answer.rrset.ttl) if answer.rrset is not None else 0.0


def _records(answer: dns.resolver.Answer, rdtype: str) -> tuple[str, ...]:
    if answer.rrset is None:
        return ()
    if rdtype in ("A", "AAAA"):
        return tuple(sorted(rdata.address for rdata in answer.rrset))
    if rdtype == "MX":
        ordered = sorted(answer.rrset, key=lambda r: (r.preference, r.exchange.to_text()))
        return tuple("." if r.exchange == dns.name.root
                     else r.exchange.to_text(omit_final_dot=True).lower() for r in ordered)
    if rdtype == "TXT":
        return tuple(b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset)
    return tuple(r.to_text() for r in answer.rrset)


def _domain_status(results: Sequence[_Result], found: bool) -> DomainStatus:
    if found:
        return "exists"
    kinds = {r.kind for r in results}
    # NXDOMAIN is about the name, whatever the type asked: it wins over another query's timeout.
    if "nxdomain" in kinds:
        return "nxdomain"
    if "timeout" in kinds:
        return "timeout"
    return "servfail" if "servfail" in kinds else "nodata"


class DnsFacts:
    """Cached, time-bounded DNS lookups for the policy checks, with counters for metrics.

    Counters: ``queries`` (sent), ``cache_hits``, ``timeouts`` and ``failures`` (SERVFAIL, REFUSED,
    unreachable server: any other failure).
    """

    def __init__(
        self,
        nameservers: Sequence[str],
        *,
        timeout: float = 2.0,
        observe: Observer | None = None,
        negative_ttl: float = 30.0,
        max_ttl: float = 3600.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(nameservers, str):
            nameservers = [nameservers]
        if not nameservers:
            # Never fall back to the system resolver: the configuration must say where to ask.
            raise ValueError("DnsFacts needs at least one nameserver")
        if timeout <= 0:
            raise ValueError("DNS timeout must be positive")
        self.timeout = float(timeout)
        self.nameservers = tuple(parse_nameserver(ns) for ns in nameservers)
        self.negative_ttl = float(negative_ttl)
        self.max_ttl = float(max_ttl)
        self.max_entries = max_entries
        self._observe = observe
        self._clock = clock
        self._resolver = self._make_resolver()
        self._cache: dict[tuple[str, str], tuple[float, _Result]] = {}
        # Name as asked -> its canonical text: parsing a name costs more than a cache hit.
        self._names: dict[str, str | None] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[_Result]] = {}
        self.queries = 0
        self.cache_hits = 0
        self.timeouts = 0
        self.failures = 0

    def _make_resolver(self) -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=False)   # configure=True reads resolv.conf
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                for host, port in self.nameservers]
        resolver.lifetime = self.timeout
        resolver.timeout = self.timeout / len(self.nameservers)
        resolver.search = []
        resolver.cache = None      # ours honours the monotonic clock and counts hits
        return resolver

    # --- the facts ------------------------------------------------------------------------------

    async def dnsbl(self, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address, zones: Sequence[Zone],
                    *, unmap: bool = True) -> dict[str, ZoneAnswer]:
        """Look ``ip`` up in every zone at once: zone name -> ListingFacts, None or TimeoutFacts.

        ``unmap``: as for :func:`~vipd.policy.dnsbl.query_name`.
        """
        deadline = time.monotonic() + self.timeout
        names = [query_name(ip, zone, unmap=unmap) for zone in zones]
        answers = await asyncio.gather(*(self._zone(name, zone, deadline)
                                         for name, zone in zip(names, zones)))
        return {zone.name: answer for zone, answer in zip(zones, answers)}

    async def _zone(self, name: str, zone: Zone, deadline: float) -> ZoneAnswer:
        found = await self._lookup(name, "A", zone.name)
        if found.kind in ("timeout", "servfail"):
            return TimeoutFacts(found.kind)
        if found.kind != "ok" or not found.records:
            return None
        if not zone.matches(found.records):
            return ListingFacts(found.records)       # an answer the zone's filter ignores: no TXT
        txt = None
        budget = deadline - time.monotonic()
        if budget >= _MIN_TXT_BUDGET:
            reason = await self._lookup(name, "TXT", zone.name, lifetime=budget)
            if reason.kind == "ok" and reason.records:
                txt = " ".join(reason.records)
        return ListingFacts(found.records, txt)

    async def domain(self, name: str) -> DomainFacts:
        """Whether ``name`` has an A, AAAA or MX record (all three asked at once)."""
        name = name.strip().lower().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            return DomainFacts(name, "exists")        # an address literal: nothing to look up
        cached = [self._cached(name, rdtype, count=False) for rdtype in ("MX", "A", "AAAA")]
        if None in cached:
            results = await asyncio.gather(*(self._lookup(name, rdtype, DOMAIN_LABEL)
                                             for rdtype in ("MX", "A", "AAAA")))
        else:
            self.cache_hits += len(cached)
            results = cached        # type: ignore[assignment]  # the common case: no task, no gather
        mx, a, aaaa = results
        addresses = a.records + aaaa.records      # records are empty unless the kind is "ok"
        status = _domain_status(results, bool(addresses or mx.records))
        return DomainFacts(name, status, addresses, mx.records)

    # --- lookups, cache, counters ---------------------------------------------------------------

    def clear_cache(self) -> None:
        self._cache.clear()

    def _canonical(self, name: str) -> str | None:
        """The name's canonical text (absolute, lower case), or None when it cannot exist."""
        text = self._names.get(name, "")
        if text == "":
            try:
                text = dns.name.from_text(name).to_text().lower()
            except dns.exception.DNSException:
                text = None       # a label over 63 octets, a name over 255
            if len(self._names) >= self.max_entries:
                self._names.clear()
            self._names[name] = text
        return text

    def _cached(self, name: str, rdtype: str, count: bool = True) -> _Result | None:
        """A lookup answered from the cache alone (``count``: as a hit), or None."""
        text = self._canonical(name)
        if text is None:
            return _Result("nxdomain")
        cached = self._cache_get((text, rdtype))
        if cached is not None and count:
            self.cache_hits += 1
        return cached

    async def _lookup(self, name: str, rdtype: str, label: str, lifetime: float | None = None) -> _Result:
        cached = self._cached(name, rdtype)
        if cached is not None:
            return cached
        text = self._canonical(name)
        assert text is not None             # _cached answered nxdomain for names that cannot exist
        key = (text, rdtype)
        shared = self._inflight.get(key)
        if shared is None:
            shared = asyncio.ensure_future(self._query(dns.name.from_text(text), key, label, lifetime))
            self._inflight[key] = shared
            shared.add_done_callback(functools.partial(self._settled, key))
        # shield: a client that goes away must not cancel the query other sessions wait on.
        return await asyncio.shield(shared)

    def _settled(self, key: tuple[str, str], _done: asyncio.Future[_Result]) -> None:
        self._inflight.pop(key, None)

    async def _query(self, qname: dns.name.Name, key: tuple[str, str], label: str,
                     lifetime: float | None) -> _Result:
        self.queries += 1
        started = time.perf_counter()
        result, ttl = await self._ask(qname, key[1], lifetime)
        if self._observe is not None:
            self._observe(label, time.perf_counter() - started)
        if result.kind == "timeout":
            self.timeouts += 1
        elif result.kind == "servfail":
            self.failures += 1
        elif ttl > 0:
            self._cache_put(key, result, min(ttl, self.max_ttl))
        return result

    async def _ask(self, qname: dns.name.Name, rdtype: str, lifetime: float | None) -> tuple[_Result, float]:
        limit = min(lifetime or self.timeout, self.timeout)
        try:
            # dnspython checks its lifetime only between tries, after a back-off sleep (0.1 s and
            # more): the asyncio deadline makes the bound exact.
            async with asyncio.timeout(limit):
                answer = await self._resolver.resolve(qname, rdtype, search=False, lifetime=limit)
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses") or {}
            response = next(iter(responses.values()), None)
            return _Result("nxdomain"), _negative_ttl(response, self.negative_ttl)
        except dns.resolver.NoAnswer as exc:
            return _Result("nodata"), _negative_ttl(exc.kwargs.get("response"), self.negative_ttl)
        except (dns.exception.Timeout, TimeoutError):
            return _Result("timeout"), 0.0
        except (dns.exception.DNSException, OSError):
            return _Result("servfail"), 0.0
        records = _records(answer, rdtype)
        return _Result("ok" if records else "nodata", records), _positive_ttl(answer)

    def _cache_get(self, key: tuple[str, str]) -> _Result | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, result = entry
        if self._clock() >= expires:
            del self._cache[key]
            return None
        return result

    def _cache_put(self, key: tuple[str, str], result: _Result, ttl: float) -> None:
        if len(self._cache) >= self.max_entries:
            self._evict()
        self._cache[key] = (self._clock() + ttl, result)

    def _evict(self) -> None:
        """Drop expired entries; if none had expired, the oldest tenth (dicts keep insertion order)."""
        now = self._clock()
        for key in [k for k, (expires, _) in self._cache.items() if expires <= now]:
            del self._cache[key]
        if len(self._cache) >= self.max_entries:
            for key in list(self._cache)[: max(1, self.max_entries // 10)]:
                del self._cache[key]
