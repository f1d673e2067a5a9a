"""Envelope sender checks at MAIL FROM: a fully-qualified sender whose domain exists in the DNS.

Pure: the domain's DNS facts are gathered by :mod:`vipd.policy.dnsfacts` and passed in. The yardstick
is Postfix's reject_non_fqdn_sender and reject_unknown_sender_domain, with sendmail's codes (553).

Rules:

- ``<>`` (bounces, RFC 5321 section 4.5.5) is always accepted: refusing it refuses delivery reports.
- An address literal domain (``user@[192.0.2.1]``) is accepted as it is: there is nothing to look up.
- A domain with no dot is refused 553 5.1.7. RFC 3463's X.1.7 is "the sender's address was
  syntactically invalid", which is what a sender we cannot reply to is; X.5.2 (Postfix's choice)
  says the *command* could not be interpreted, and it was interpreted fine.
- No A, AAAA or MX record (NXDOMAIN or an empty answer) is a permanent 553 5.1.8, "bad sender's
  system address"; a null MX (RFC 7505) is 550 5.7.27 as that RFC's section 4.2 says. A lookup that
  timed out or failed is 451 4.4.3 (directory server failure): the domain may well exist.
- No facts (DNS checks switched off) is no evidence: accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..smtp.commands import Address
from ..smtp.replies import Reply
from .verdict import ACCEPT, Verdict

__all__ = [
    "DomainFacts",
    "DomainStatus",
    "SENDER_NOT_FQDN",
    "SENDER_DOMAIN_NOT_FOUND",
    "SENDER_NULL_MX",
    "SENDER_DOMAIN_TEMPFAIL",
    "check_sender",
    "is_fully_qualified",
]

DomainStatus = Literal["exists", "nxdomain", "nodata", "timeout", "servfail"]


@dataclass(frozen=True, slots=True)
class DomainFacts:
    """What the DNS says about a domain's mail records.

    ``status``: "exists" (an A, AAAA or MX record), "nxdomain" (the name does not exist), "nodata"
    (the name exists with none of those records), "timeout" or "servfail" (no usable answer).
    ``mx`` holds exchange names by preference, ``"."`` alone being a null MX.
    """

    name: str
    status: DomainStatus
    addresses: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()

    @property
    def exists(self) -> bool:
        return self.status == "exists"

    @property
    def failed(self) -> bool:
        return self.status in ("timeout", "servfail")

    @property
    def null_mx(self) -> bool:
        # RFC 7505 section 3: a null MX is the domain's only MX record, exchange ".".
        return self.mx == (".",)


SENDER_NOT_FQDN = Reply(553, "5.1.7", "Sender address must be fully qualified")
SENDER_DOMAIN_NOT_FOUND = Reply(553, "5.1.8", "Sender address rejected: Domain not found")
SENDER_NULL_MX = Reply(550, "5.7.27", "Sender address rejected: Domain does not accept mail (null MX)")
SENDER_DOMAIN_TEMPFAIL = Reply(451, "4.4.3",
                               "Sender address rejected: Domain lookup failed, try again later")


def _is_literal(domain: str) -> bool:
    return domain.startswith("[") and domain.endswith("]")


def is_fully_qualified(domain: str) -> bool:
    """A domain with at least two non-empty labels (or an address literal)."""
    if _is_literal(domain):
        return True
    labels = domain.rstrip(".").split(".")
    return len(labels) >= 2 and all(labels)


def check_sender(address: Address, facts: DomainFacts | None) -> Verdict:
    """Decide MAIL FROM from the address and, when looked up, its domain's DNS facts."""
    if address.is_null or _is_literal(address.domain):
        return ACCEPT
    if not is_fully_qualified(address.domain):
        return Verdict("reject", SENDER_NOT_FQDN, "sender_fqdn")
    if facts is None:
        return ACCEPT
    if facts.failed:
        return Verdict("tempfail", SENDER_DOMAIN_TEMPFAIL, "sender_domain")
    if not facts.exists:
        return Verdict("reject", SENDER_DOMAIN_NOT_FOUND, "sender_domain")
    if facts.null_mx:
        return Verdict("reject", SENDER_NULL_MX, "sender_domain")
    return ACCEPT
