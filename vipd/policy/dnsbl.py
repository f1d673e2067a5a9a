"""DNSBL decisions: from the answers each list gave for a client address to accept or a 554 refusal.

Pure: the lookups are made by :mod:`vipd.policy.dnsfacts`; this module names what to look up
(:func:`query_name`, RFC 5782 section 2) and scores what came back (:func:`interpret`), in the manner
of Postfix postscreen's ``postscreen_dnsbl_sites`` (weights, answer filters, a threshold) with the
reply text of Postfix's ``reject_rbl_client``.

Rules:

- A zone counts only when its A answer passes the zone's filter. Without a filter any 127.0.0.0/8
  answer counts except 127.255.255.0/24, where lists such as Spamhaus put their error codes
  ("query through a public resolver", "rate limited"): counting those would refuse every client.
  An answer outside 127/8 never counts (a resolver that rewrites NXDOMAIN to an advertising host).
- A lookup that timed out or failed never counts: mail is not refused because a list is down; the
  caller logs and counts the failure.
- Weights may be negative, so an allow list (list.dnswl.org style) can offset a block list.
- The TXT record comes from someone else's DNS and goes into our SMTP reply: it is reduced to one
  line of printable ASCII and cut to a bounded length, so it can never add a reply line.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from string import Template
from typing import Iterable, Mapping, Sequence

from ..smtp.replies import Reply
from .verdict import ACCEPT, Verdict

__all__ = [
    "Zone",
    "ListingFacts",
    "TimeoutFacts",
    "ZoneAnswer",
    "DEFAULT_TEMPLATE",
    "TEMPLATE_FIELDS",
    "DNSBL_REJECT",
    "query_name",
    "check_template",
    "hits",
    "failures",
    "score",
    "interpret",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_TEMPLATE = "Service unavailable; Client host [$client] blocked using $zone$txt_suffix"
"""Postfix's default_rbl_reply, with its ``${rbl_reason?; $rbl_reason}`` written as ``$txt_suffix``."""

TEMPLATE_FIELDS = frozenset({"client", "zone", "txt", "txt_suffix"})

DNSBL_REJECT = Reply(554, "5.7.1", "Service unavailable; client blocked by a DNS block list")
"""The reply's code and status; its text is built from the template for each refusal."""

_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
# Spamhaus (and others copying it) answer 127.255.255.252-255 for errors, never for a listing.
_ERROR_CODES = ipaddress.IPv4Network("127.255.255.0/24")
_ZONE_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_MAX_TXT = 200


def _parse_range(text: str) -> tuple[int, int]:
    """``a.b.c.d``, ``a.b.c.d-e.f.g.h`` or ``a.b.c.d/len`` as an inclusive range of IPv4 integers."""
    text = text.strip()
    try:
        if "/" in text:
            net = ipaddress.IPv4Network(text, strict=False)
            return int(net.network_address), int(net.broadcast_address)
        low, dash, high = text.partition("-")
        first = int(ipaddress.IPv4Address(low.strip()))
        last = int(ipaddress.IPv4Address(high.strip())) if dash else first
    except ValueError as exc:
        raise ValueError(f"bad DNSBL answer filter {text!r}: {exc}") from None
    if last < first:
        raise ValueError(f"bad DNSBL answer filter {text!r}: range runs backwards")
    return first, last


@dataclass(frozen=True, slots=True)
class Zone:
    """One DNS list: its zone name, the weight a listing adds, and which answers mean "listed".

    ``accept`` holds addresses, ``first-last`` ranges or CIDR blocks (``("127.0.0.2-127.0.0.11",)``);
    None means any 127/8 answer outside the 127.255.255.0/24 error codes.
    """

    name: str
    weight: int = 1
    accept: tuple[str, ...] | None = None
    _ranges: tuple[tuple[int, int], ...] | None = field(
        default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        name = self.name.strip().lower().rstrip(".")
        labels = name.split(".")
        if len(name) > 200 or len(labels) < 2 or not all(_ZONE_LABEL.fullmatch(x) for x in labels):
            raise ValueError(f"bad DNSBL zone name {self.name!r}")
        object.__setattr__(self, "name", name)
        if isinstance(self.accept, str):     # a lone string would be iterated character by character
            object.__setattr__(self, "accept", (self.accept,))
        if self.accept is not None:
            accept = tuple(self.accept)
            if not accept:
                raise ValueError(f"DNSBL zone {name}: empty answer filter (use None for any answer)")
            object.__setattr__(self, "accept", accept)
            object.__setattr__(self, "_ranges", tuple(_parse_range(x) for x in accept))

    def matches(self, addresses: Iterable[str]) -> bool:
        """True when any A answer means "listed" for this zone."""
        return any(self._matches_one(a) for a in addresses)

    def _matches_one(self, text: str) -> bool:
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            return False
        if self._ranges is None:
            return address in _LOOPBACK and address not in _ERROR_CODES
        value = int(address)
        return any(first <= value <= last for first, last in self._ranges)


@dataclass(frozen=True, slots=True)
class ListingFacts:
    """The zone answered: its A records (the listing codes) and its TXT record, if it had one."""

    addresses: tuple[str, ...]
    txt: str | None = None


@dataclass(frozen=True, slots=True)
class TimeoutFacts:
    """The lookup gave no answer: ``reason`` is "timeout" or "servfail" (any other failure)."""

    reason: str = "timeout"


ZoneAnswer = ListingFacts | TimeoutFacts | None
"""Per zone: listed (ListingFacts), not listed (None: NXDOMAIN or no A record) or unknown."""


def _client_address(ip: str | IPAddress, unmap: bool) -> IPAddress:
    address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    # An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d; lists index it by its IPv4 form.
    if unmap and isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def query_name(ip: str | IPAddress, zone: Zone | str, *, unmap: bool = True) -> str:
    """The name to look up (RFC 5782 section 2.1 and 2.4): reversed octets or nibbles, then the zone.

    ``unmap=False`` keeps an IPv4-mapped IPv6 address as IPv6 (RFC 5782's IPv6 test point
    ``::ffff:7f00:2`` is one).
    """
    address = _client_address(ip, unmap)
    zone_name = zone.name if isinstance(zone, Zone) else zone.strip().lower().rstrip(".")
    if isinstance(address, ipaddress.IPv4Address):
        reversed_part = ".".join(reversed(str(address).split(".")))
    else:
        reversed_part = ".".join(reversed(address.exploded.replace(":", "")))
    return f"{reversed_part}.{zone_name}"


def check_template(template: str) -> None:
    """Raise ValueError when the reply template is malformed or names an unknown field (for config)."""
    tpl = Template(template)
    if not tpl.is_valid():
        raise ValueError(f"bad DNSBL reply template {template!r}: a '$' must start a field or be '$$'")
    unknown = set(tpl.get_identifiers()) - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(f"bad DNSBL reply template: unknown field(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(TEMPLATE_FIELDS))}")


def hits(answers: Mapping[str, ZoneAnswer], zones: Sequence[Zone]) -> list[tuple[Zone, ListingFacts]]:
    """The zones, in configuration order, whose answer counts as a listing."""
    out = []
    for zone in zones:
        facts = answers.get(zone.name)
        if isinstance(facts, ListingFacts) and zone.matches(facts.addresses):
            out.append((zone, facts))
    return out


def failures(answers: Mapping[str, ZoneAnswer]) -> list[str]:
    """Zones whose lookup timed out or failed: for the caller's log line and counter."""
    return [name for name, facts in answers.items() if isinstance(facts, TimeoutFacts)]


def score(answers: Mapping[str, ZoneAnswer], zones: Sequence[Zone]) -> int:
    return sum(zone.weight for zone, _ in hits(answers, zones))


def _clean_txt(txt: str | None) -> str:
    if not txt:
        return ""
    one_line = _UNPRINTABLE.sub(" ", txt).strip()
    one_line = re.sub(r" {2,}", " ", one_line)
    return one_line[:_MAX_TXT]


def _reply_text(template: str, client: str, zone: Zone, txt: str) -> str:
    text = Template(template).safe_substitute(
        client=client, zone=zone.name, txt=txt, txt_suffix=f"; {txt}" if txt else "")
    # The template is ours, but stay one reply line whatever it holds.
    return _UNPRINTABLE.sub(" ", text).strip()


def interpret(
    answers: Mapping[str, ZoneAnswer],
    zones: Sequence[Zone],
    threshold: int = 1,
    template: str = DEFAULT_TEMPLATE,
    *,
    client: str | IPAddress,
) -> Verdict:
    """Refuse with 554 5.7.1 when the listed zones' weights reach ``threshold``; else ACCEPT.

    ``client`` (the address that was looked up) fills ``$client``; IPv4-mapped is shown as IPv4.
    The reply names the first listed zone in configuration order, with its TXT record.
    """
    if threshold < 1:
        raise ValueError("DNSBL threshold must be at least 1 (0 would refuse every client)")
    listed = hits(answers, zones)
    if sum(zone.weight for zone, _ in listed) < threshold:
        return ACCEPT
    # The reply names a zone that added to the score: with negative weights, skip the allow lists.
    zone, facts = next(((z, f) for z, f in listed if z.weight > 0), listed[0])
    shown = str(_client_address(client, unmap=True))
    text = _reply_text(template, shown, zone, _clean_txt(facts.txt))
    return Verdict("reject", DNSBL_REJECT.with_text(text), "dnsbl")
