"""HELO/EHLO checks: the name's syntax, a client claiming to be us, and (opt-in) whether it resolves.

Pure: DNS facts come from :mod:`vipd.policy.dnsfacts`. Postfix is the yardstick:
``check_helo_syntax(strict=False)`` is reject_invalid_helo_hostname, ``strict=True`` adds
reject_non_fqdn_helo_hostname, ``check_helo_resolves`` is reject_unknown_helo_hostname (450 4.7.1).

Decisions:

- RFC 5321 section 4.1.1.1 asks for the client's fully-qualified name, or an address literal when it
  has none, and section 2.3.5 permits only FQDNs. Yet many submission clients and appliances send a
  bare host name ("DESKTOP-1X2Y"), and section 4.1.4 forbids refusing mail because the HELO name does
  not verify. So the default (``strict=False``) accepts a single label, an underscore (Windows host
  names; Postfix accepts it) and a bare IP address (Postfix's valid_hostaddr), and refuses only what
  is not a host name at all. ``strict=True`` is RFC 5321's grammar: letters, digits and inner
  hyphens, at least one dot, no all-numeric top label, addresses only in brackets.
- An address literal must hold a real address: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``. The
  general form ``[tag:...]`` has no registered tags and is refused.
- A client naming one of our names or addresses is lying (a common spam-bot trick) unless it
  connects from one of our own addresses, where the claim is true: 550 5.7.1.
- ``check_helo_resolves`` goes beyond RFC 5321 and is for the configuration to switch on; a name
  with no A, AAAA or MX record gets 450 4.7.1 (Postfix's unknown_hostname_reject_code) unless
  ``permanent``; a failed lookup 451 4.4.3.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable

from ..smtp.replies import Reply
from .sender import DomainFacts
from .verdict import ACCEPT, Verdict

__all__ = [
    "HELO_INVALID",
    "HELO_NOT_FQDN",
    "HELO_NOT_US",
    "HELO_UNKNOWN",
    "HELO_UNKNOWN_PERMANENT",
    "HELO_LOOKUP_FAILED",
    "parse_address_literal",
    "is_address",
    "check_helo_syntax",
    "check_helo_identity",
    "check_helo_resolves",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HELO_INVALID = Reply(501, "5.5.2", "Invalid HELO name")
HELO_NOT_FQDN = Reply(501, "5.5.2", "Invalid HELO name: need a fully-qualified hostname or address literal")
HELO_NOT_US = Reply(550, "5.7.1", "Helo command rejected: You are not me")
HELO_UNKNOWN = Reply(450, "4.7.1", "Helo command rejected: Host not found")
HELO_UNKNOWN_PERMANENT = Reply(550, "5.7.1", "Helo command rejected: Host not found")
HELO_LOOKUP_FAILED = Reply(451, "4.4.3", "Helo command rejected: Host lookup failed, try again later")

_STRICT_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_LENIENT_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_NUMERIC = re.compile(r"[0-9.]+")


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_address_literal(text: str) -> IPAddress | None:
    """``[192.0.2.1]`` or ``[IPv6:...]`` (RFC 5321 section 4.1.3) as an address; None otherwise."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            v6 = inner[5:]
            # ipaddress accepts a scope ("%eth0"), which is no part of RFC 5321's IPv6-addr.
            return None if "%" in v6 else ipaddress.IPv6Address(v6)
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def _bare_address(text: str) -> IPAddress | None:
    if "%" in text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_address(helo: str) -> bool:
    """True for an address literal or a bare address: names nothing to look up in the DNS."""
    return parse_address_literal(helo) is not None or _bare_address(helo) is not None


def _valid_name(name: str, strict: bool) -> bool:
    if strict and name.endswith("."):
        return False
    name = name[:-1] if name.endswith(".") else name
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    pattern = _STRICT_LABEL if strict else _LENIENT_LABEL
    if not all(pattern.fullmatch(label) for label in labels):
        return False
    if _NUMERIC.fullmatch(name):
        return False          # looks like an address but is not one (Postfix: "numeric hostname")
    # RFC 3696 section 2: top-level domains are never all-numeric.
    return not (strict and labels[-1].isdigit())


def check_helo_syntax(helo: str, *, strict: bool = False) -> Verdict:
    """501 5.5.2 unless ``helo`` is a host name or an address literal (see the module's rules)."""
    if helo.startswith("["):
        ok = parse_address_literal(helo) is not None
        return ACCEPT if ok else Verdict("reject", HELO_INVALID, "helo_syntax")
    if _bare_address(helo) is not None:
        # RFC 5321 wants brackets round an address; Postfix accepts it bare.
        return Verdict("reject", HELO_NOT_FQDN, "helo_syntax") if strict else ACCEPT
    if not _valid_name(helo, strict):
        return Verdict("reject", HELO_INVALID, "helo_syntax")
    if strict and "." not in helo.rstrip("."):
        return Verdict("reject", HELO_NOT_FQDN, "helo_syntax")
    return ACCEPT


def _as_addresses(values: Iterable[str | IPAddress]) -> set[IPAddress]:
    out = set()
    for value in values:
        address = ipaddress.ip_address(value) if isinstance(value, str) else value
        out.add(_unmapped(address))
    return out


def check_helo_identity(
    helo: str,
    our_names: Iterable[str],
    our_addresses: Iterable[str | IPAddress],
    *,
    client: str | IPAddress | None = None,
) -> Verdict:
    """550 5.7.1 when the client claims one of our names or addresses and is not connecting from ours.

    Names compare case-insensitively and without a trailing dot.
    """
    ours = _as_addresses(our_addresses)
    if client is not None and _as_addresses([client]) & ours:
        return ACCEPT
    claimed = parse_address_literal(helo) or _bare_address(helo)
    if claimed is not None:
        lying = _unmapped(claimed) in ours
    else:
        names = {n.lower().rstrip(".") for n in our_names}
        lying = helo.lower().rstrip(".") in names
    return Verdict("reject", HELO_NOT_US, "helo_identity") if lying else ACCEPT


def check_helo_resolves(helo: str, facts: DomainFacts | None, *, permanent: bool = False) -> Verdict:
    """Refuse a HELO name with no A, AAAA or MX record (450 4.7.1, or 550 5.7.1 if ``permanent``)."""
    if facts is None or is_address(helo) or facts.exists:
        return ACCEPT
    if facts.failed:
        return Verdict("tempfail", HELO_LOOKUP_FAILED, "helo_dns")
    if permanent:
        return Verdict("reject", HELO_UNKNOWN_PERMANENT, "helo_dns")
    return Verdict("tempfail", HELO_UNKNOWN, "helo_dns")
