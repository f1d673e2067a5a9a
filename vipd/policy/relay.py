"""Relay control: may this client hand us mail for this recipient? (sendmail's check_rcpt,
Postfix's reject_unauth_destination.) One pure function, `check_relay`.

Rules, in order:

1. A client that may relay gets every recipient. The caller computes that from its trusted
   networks and `AccessMap.client_relays` (IP entries and exact host names only: with
   FEATURE(relay_hosts_only) ``mydomain.com RELAY`` names one host, not every host whose
   name ends in mydomain.com).
2. From any other client, sender-specified routing is refused whatever the domain: a source
   route (``<@a:user@b>``), or ``%``, ``!`` or ``@`` in the local part, quoted or not. A host
   that accepts ``user%elsewhere@ours`` and passes it to a hub that honours the percent hack is
   an open relay (sendmail cf/README, the nouucp / nopercenthack notice; Postfix
   allow_untrusted_routing = no for the same reason).
3. Otherwise the recipient's domain must be ours: listed in `relay_domains` exactly (an entry
   ``.example.com`` covers the subdomains of example.com but not example.com itself, as in the
   mailertable; sendmail's class {R} covers subdomains only without relay_hosts_only), or named
   by a ``To:`` or untagged RELAY access entry for exactly that domain. An address literal is
   foreign unless listed literally (``[192.0.2.1]``). ``<postmaster>`` without a domain is ours
   (RFC 5321 4.1.1.3).
4. Else ``550 5.7.1 Relaying denied``.

The sender is deliberately not a parameter: a sender address in our own domain never grants
relaying (FEATURE(relay_local_from) is the hole cf/README warns "will allow spammers to spam
using your mail server by simply specifying a return address of user@your.domain.com").
Domains arrive lower-cased without a trailing dot (vipd.smtp.commands.Address does that).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..smtp.commands import Address
from ..smtp.replies import Reply
from .access import AccessMap, normalize_domain
from .verdict import Verdict

__all__ = [
    "RELAYING_DENIED",
    "check_relay",
    "has_sender_routing",
    "is_relay_domain",
    "normalize_relay_domains",
]

# --- replies --------------------------------------------------------------------------------
RELAYING_DENIED = Reply(550, "5.7.1", "Relaying denied")

CHECK = "relay"
_ALLOWED = Verdict("accept", None, CHECK)
_DENIED = Verdict("reject", RELAYING_DENIED, CHECK)

# Characters that route mail onwards from inside a local part: % (percent hack), ! (UUCP bang
# path), @ (only possible quoted: "user@elsewhere"@ours). Postfix's user[@%!]remote[@%!]site.
_ROUTING_CHARS = frozenset("%!@")


def check_relay(
    rcpt: Address,
    *,
    client_may_relay: bool,
    relay_domains: frozenset[str],
    access: AccessMap | None,
) -> Verdict:
    """Accept (kind "accept", check "relay") or refuse with 550 5.7.1 Relaying denied.

    `relay_domains` holds normalized entries (see `normalize_relay_domains`).
    """
    if client_may_relay:
        return _ALLOWED
    if has_sender_routing(rcpt):
        return _DENIED
    domain = normalize_domain(rcpt.domain)
    if not domain:
        # Only <postmaster> parses without a domain; it always means us.
        return _ALLOWED if rcpt.local.lower() == "postmaster" else _DENIED
    if is_relay_domain(domain, relay_domains):
        return _ALLOWED
    if access is not None and access.relays_to(domain):
        return _ALLOWED
    return _DENIED


def has_sender_routing(rcpt: Address) -> bool:
    """Does the address carry routing of its own: a source route, or %, ! or @ in the local part?"""
    # The local part is checked as written, quotes included: quoting hides nothing, since
    # "user%elsewhere" routes exactly as user%elsewhere does on a host that honours it.
    return rcpt.had_route or not _ROUTING_CHARS.isdisjoint(rcpt.local)


def is_relay_domain(domain: str, relay_domains: frozenset[str]) -> bool:
    """Exact entries match themselves; ``.example.com`` matches any name below example.com."""
    if domain in relay_domains:
        return True
    if domain.startswith("["):
        return False        # literals match only literally: their "parents" are no domains
    labels = domain.split(".")
    return any("." + ".".join(labels[start:]) in relay_domains for start in range(1, len(labels)))


def normalize_relay_domains(domains: Iterable[str]) -> frozenset[str]:
    """Lower-case, drop trailing dots, canonicalize literals; ValueError names every bad entry."""
    out: set[str] = set()
    bad: list[str] = []
    for entry in domains:
        dot = entry.strip().startswith(".")
        name = normalize_domain(entry.strip().removeprefix(".") if dot else entry)
        if not name or (name.startswith("[") and dot) or not _plausible(name):
            bad.append(entry)
            continue
        out.add("." + name if dot else name)
    if bad:
        raise ValueError("bad relay domain(s): " + ", ".join(repr(entry) for entry in bad))
    return frozenset(out)


def _plausible(name: str) -> bool:
    if name.startswith("["):
        return name.endswith("]")
    labels = name.split(".")
    return all(label and all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in label)
               for label in labels)
