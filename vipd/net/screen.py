"""The early checks of one client session: gather facts (access map, DNS) and ask the pure decisions.

Rules (docs/policy.md):
- Facts are gathered as early as possible and awaited as late as possible: the DNSBL lookups start
  at connect, the first command that needs their answer waits for it (never past the lookup timeout).
- Client verdicts (access `Connect:`, DNSBL) are given at MAIL, or at RCPT with `delay_checks` (so
  the log line names the recipient); sender verdicts at MAIL, or at RCPT with `delay_checks`.
- An access `OK` or `RELAY` for the client skips the DNSBL (sendmail: the access map overrides it).
- A DNS failure never refuses mail with a 5xx: lists that time out count as not listed; a sender
  domain that cannot be looked up gets 4xx.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import VipConfig
from ..policy.access import normalize_domain
from ..policy.dnsbl import DEFAULT_TEMPLATE, Zone, interpret
from ..policy.helo import check_helo_identity, check_helo_resolves, check_helo_syntax
from ..policy.relay import check_relay, is_relay_domain, normalize_relay_domains
from ..policy.sender import check_sender
from ..policy.verdict import ACCEPT, Verdict
from ..smtp.commands import Address

if TYPE_CHECKING:
    from ..policy.dnsfacts import DnsFacts

__all__ = ["Screen", "Prepared", "prepare"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """What every session of one VIP shares, worked out once per config (not per connection)."""

    zones: tuple[Zone, ...]
    relay_domains: frozenset[str]
    our_addresses: frozenset[str]


def prepare(vip: VipConfig, our_addresses: frozenset[str]) -> Prepared:
    return Prepared(tuple(Zone(z.zone, z.weight, z.accept) for z in vip.dnsbl),
                    normalize_relay_domains(vip.relay_domains), our_addresses)


class Screen:
    """Per session: what the checks found out about the client, and their verdicts."""

    def __init__(self, vip: VipConfig, ip: str, dns: DnsFacts | None, prepared: Prepared) -> None:
        self.vip = vip
        self.ip = ip
        self.dns = dns
        self.our_addresses = prepared.our_addresses
        self.zones = zones = prepared.zones
        access = vip.access
        client = access.lookup_client(ip, None) if access is not None else None
        self.client_verdict: Verdict = client or ACCEPT
        # relay_hosts_only: only IP entries (and exact host names, which we do not look up) relay.
        self.may_relay = (_in_networks(ip, vip.trusted_networks)
                          or (access is not None and access.client_relays(ip, None)))
        self._relay_domains = prepared.relay_domains
        self.sender_verdict: Verdict = ACCEPT
        self._dnsbl: asyncio.Future[Verdict] | None = None
        skip_lists = self.client_verdict.kind in ("ok", "relay") or self.may_relay
        if zones and dns is not None and not skip_lists and not self.client_verdict.refuses:
            self._dnsbl = asyncio.ensure_future(self._lookup_lists())

    async def _lookup_lists(self) -> Verdict:
        """Every list at once; a list that times out counts as not listed (DnsFacts counts it)."""
        assert self.dns is not None
        answers = await self.dns.dnsbl(self.ip, self.zones)
        return interpret(answers, self.zones, self.vip.dnsbl_threshold,
                         self.vip.dnsbl_reply or DEFAULT_TEMPLATE, client=self.ip)

    async def _client(self) -> Verdict:
        """The client's verdict, waiting for the DNSBL answers if they are still on their way."""
        if self.client_verdict.refuses or self._dnsbl is None:
            return self.client_verdict
        listed = await self._dnsbl
        return listed if listed.refuses else self.client_verdict

    def _client_now(self) -> Verdict | None:
        """The client's verdict if known without waiting; None while the DNSBL is still out."""
        if self.client_verdict.refuses or self._dnsbl is None:
            return self.client_verdict
        if not self._dnsbl.done():
            return None
        listed = self._dnsbl.result()
        return listed if listed.refuses else self.client_verdict

    def close(self) -> None:
        if self._dnsbl is not None and not self._dnsbl.done():
            self._dnsbl.cancel()

    # --- the stages: each a Verdict now, or a future of one when DNS must answer first ---------
    def helo(self, name: str) -> Verdict | asyncio.Future[Verdict]:
        for verdict in (check_helo_syntax(name, strict=self.vip.helo_strict),
                        check_helo_identity(name, (self.vip.hostname,), self.our_addresses,
                                            client=self.ip)):
            if verdict.refuses:
                return verdict
        if self.vip.reject_unknown_helo and self.dns is not None and not name.startswith("["):
            return asyncio.ensure_future(self._helo_resolves(name))
        return ACCEPT

    async def _helo_resolves(self, name: str) -> Verdict:
        assert self.dns is not None
        return check_helo_resolves(name, await self.dns.domain(name))

    def mail(self, sender: Address) -> Verdict | asyncio.Future[Verdict]:
        """Sender checks (and, without delay_checks, the client's verdict)."""
        if self._sender_needs_dns(sender) or (not self.vip.delay_checks and self._client_now() is None):
            return asyncio.ensure_future(self._mail(sender))
        self.sender_verdict = self._sender_now(sender)
        if self.vip.delay_checks:
            return ACCEPT
        client = self._client_now()
        assert client is not None
        return client if client.refuses else self.sender_verdict

    async def _mail(self, sender: Address) -> Verdict:
        if self._sender_needs_dns(sender):
            assert self.dns is not None
            verdict = check_sender(sender, await self.dns.domain(sender.domain))
        else:
            verdict = self._sender_now(sender)
        self.sender_verdict = verdict
        if self.vip.delay_checks:
            return ACCEPT
        client = await self._client()
        return client if client.refuses else verdict

    def _trusted(self) -> bool:
        return self.client_verdict.kind in ("ok", "relay") or self.may_relay

    def _sender_needs_dns(self, sender: Address) -> bool:
        return (self.dns is not None and self.vip.check_sender_domain and not self._trusted()
                and not sender.is_null and bool(sender.domain) and not sender.domain.startswith("[")
                and self._sender_access(sender) is None)

    def _sender_access(self, sender: Address) -> Verdict | None:
        access = self.vip.access.lookup_sender(sender) if self.vip.access is not None else None
        return access if access is not None and access.kind != "accept" else None

    def _sender_now(self, sender: Address) -> Verdict:
        if self._trusted():
            return ACCEPT
        access = self._sender_access(sender)
        if access is not None:
            return access if access.kind != "ok" else ACCEPT
        if not sender.is_null and not sender.domain:
            return check_sender(sender, None)       # not fully qualified
        return ACCEPT

    def rcpt(self, rcpt: Address) -> Verdict | asyncio.Future[Verdict]:
        if self.vip.delay_checks:
            client = self._client_now()
            if client is None:
                return asyncio.ensure_future(self._rcpt_after_lists(rcpt))
            for verdict in (client, self.sender_verdict):
                if verdict.refuses:
                    return verdict
        return self._rcpt_now(rcpt)

    async def _rcpt_after_lists(self, rcpt: Address) -> Verdict:
        for verdict in (await self._client(), self.sender_verdict):
            if verdict.refuses:
                return verdict
        return self._rcpt_now(rcpt)

    def _rcpt_now(self, rcpt: Address) -> Verdict:
        ours = self._relay_domains
        routes = self.vip.routes
        if routes is not None and rcpt.domain and routes.names(rcpt.domain):
            ours = ours | {normalize_domain(rcpt.domain)}    # the routing table's domains are ours too
        access = self.vip.access
        if access is not None:
            local = not rcpt.domain or is_relay_domain(normalize_domain(rcpt.domain), ours)
            verdict = access.lookup_recipient(rcpt, local=local)
            if verdict is not None and (verdict.refuses or verdict.kind == "discard"):
                return verdict
        return check_relay(rcpt, client_may_relay=self.may_relay, relay_domains=ours, access=access)


def _in_networks(ip: str, networks) -> bool:
    if not networks:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)
