"""Tests for vipd.policy.relay: who may send to which recipient, and the routing tricks refused."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vipd.policy.access import AccessMap, parse_access
from vipd.policy.relay import (
    RELAYING_DENIED,
    check_relay,
    has_sender_routing,
    is_relay_domain,
    normalize_relay_domains,
)
from vipd.policy.verdict import Verdict
from vipd.smtp.commands import Address, parse_path
from vipd.smtp.replies import Reply

OURS = normalize_relay_domains(["local.example", ".sub.local.example", "[192.0.2.1]",
                                "[IPv6:2001:db8::25]"])
ACCEPTED = Verdict("accept", None, "relay")
REFUSED = Verdict("reject", Reply(550, "5.7.1", "Relaying denied"), "relay")


def rcpt(text: str) -> Address:
    address = parse_path(text, allow_null=False, allow_postmaster=True)
    assert address is not None, text
    return address


def check(text: str, *, trusted: bool, access: AccessMap | None = None,
          domains: frozenset[str] = OURS) -> Verdict:
    return check_relay(rcpt(text), client_may_relay=trusted, relay_domains=domains, access=access)


def test_denial_reply() -> None:
    assert RELAYING_DENIED == Reply(550, "5.7.1", "Relaying denied")
    assert check("<user@foreign.example>", trusted=False) == REFUSED


def test_plain_mail_to_a_relay_domain_is_accepted_from_anyone() -> None:
    assert check("<user@local.example>", trusted=False) == ACCEPTED
    assert check("<user@local.example>", trusted=True) == ACCEPTED


def test_foreign_domain_needs_a_client_that_may_relay() -> None:
    assert check("<user@foreign.example>", trusted=False) == REFUSED
    assert check("<user@foreign.example>", trusted=True) == ACCEPTED


def test_postmaster_without_domain_is_always_ours() -> None:
    assert check("<postmaster>", trusted=False) == ACCEPTED
    assert check("<Postmaster>", trusted=False) == ACCEPTED


# --- one test per routing trick ----------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "<user%foreign.example@local.example>",          # percent hack
    "<foreign.example!user@local.example>",          # UUCP bang path
    "<@local.example:user@foreign.example>",         # source route ending abroad
    "<@foreign.example:user@local.example>",         # source route through a foreign host
    "<@local.example,@other.example:user@local.example>",
    '<"user@foreign.example"@local.example>',        # quoted @
    '<"user%foreign.example"@local.example>',        # quoted percent hack
    '<"foreign.example!user"@local.example>',        # quoted bang path
])
def test_routing_trick_is_refused_from_untrusted_and_accepted_from_trusted(path: str) -> None:
    assert has_sender_routing(rcpt(path))
    assert check(path, trusted=False) == REFUSED
    assert check(path, trusted=True) == ACCEPTED


def test_routing_is_refused_even_when_the_access_map_relays_the_domain() -> None:
    access = parse_access("To:local.example RELAY\n", "t")
    assert check("<user%foreign.example@local.example>", trusted=False, access=access,
                 domains=frozenset()) == REFUSED


def test_plain_addresses_carry_no_routing() -> None:
    assert not has_sender_routing(rcpt("<first.last+tag@local.example>"))
    assert not has_sender_routing(rcpt('<"first last"@local.example>'))


def test_address_literal_is_foreign_unless_listed_literally() -> None:
    assert check("<user@[192.0.2.1]>", trusted=False) == ACCEPTED
    assert check("<user@[192.0.2.99]>", trusted=False) == REFUSED
    assert check("<user@[192.0.2.99]>", trusted=True) == ACCEPTED
    assert check("<user@[IPv6:2001:DB8:0::25]>", trusted=False) == ACCEPTED   # same address, other spelling
    assert check("<user@[IPv6:2001:db8::26]>", trusted=False) == REFUSED


def test_literals_never_match_dot_entries() -> None:
    # Built by hand: normalize_relay_domains would refuse ".0.2.1]" outright.
    domains = frozenset({".1", ".0.2.1]", ".2.1]"})
    assert not is_relay_domain("[192.0.2.1]", domains)
    assert check("<user@[192.0.2.1]>", trusted=False, domains=domains) == REFUSED


def test_trailing_dot_is_normalized() -> None:
    assert check("<user@foreign.example.>", trusted=False) == REFUSED
    assert check("<user@foreign.example.>", trusted=True) == ACCEPTED
    assert check("<user@local.example.>", trusted=False) == ACCEPTED


def test_mixed_case_is_normalized() -> None:
    assert check("<user@Foreign.EXAMPLE>", trusted=False) == REFUSED
    assert check("<user@Foreign.EXAMPLE>", trusted=True) == ACCEPTED
    assert check("<User@LOCAL.Example>", trusted=False) == ACCEPTED


# --- which domains are ours -------------------------------------------------------------------

def test_exact_entry_does_not_cover_subdomains() -> None:
    assert check("<user@host.local.example>", trusted=False) == REFUSED


def test_dot_entry_covers_subdomains_but_not_the_domain_itself() -> None:
    assert check("<user@a.sub.local.example>", trusted=False) == ACCEPTED
    assert check("<user@a.b.sub.local.example>", trusted=False) == ACCEPTED
    assert check("<user@sub.local.example>", trusted=False) == REFUSED


@pytest.mark.parametrize("lookalike", [
    "<user@evillocal.example>",
    "<user@local.example.foreign.example>",
    "<user@local-example>",
    "<user@xsub.local.example>",
])
def test_lookalike_domains_are_foreign(lookalike: str) -> None:
    assert check(lookalike, trusted=False) == REFUSED


def test_access_relay_entry_for_the_recipient_domain() -> None:
    access = parse_access("To:partner.example RELAY\nold.example RELAY\n", "t")
    assert check("<a@partner.example>", trusted=False, access=access) == ACCEPTED
    assert check("<a@old.example>", trusted=False, access=access) == ACCEPTED      # untagged counts
    assert check("<a@mx.partner.example>", trusted=False, access=access) == REFUSED  # relay_hosts_only


@pytest.mark.parametrize("entry", [
    "Connect:partner.example RELAY",     # relaying *from* it, not to it
    "From:partner.example RELAY",        # a sender never grants relaying
    "To:partner.example OK",             # OK allows less than RELAY
    "To:partner.example DISCARD",
])
def test_other_access_entries_do_not_open_the_domain(entry: str) -> None:
    access = parse_access(entry + "\n", "t")
    assert check("<a@partner.example>", trusted=False, access=access) == REFUSED


def test_the_sender_is_not_an_input() -> None:
    # relay_local_from is an open relay: the function must have no way to consider the sender.
    parameters = set(inspect.signature(check_relay).parameters)
    assert parameters == {"rcpt", "client_may_relay", "relay_domains", "access"}


def test_paper_access_map_drives_client_permission() -> None:
    access = parse_access("10 RELAY\n10.1.1 OK\nmydomain.com RELAY\n", "paper")
    for ip, host, may in [("10.9.9.9", None, True), ("10.1.1.6", None, False),
                          ("203.0.113.5", "mydomain.com", True),
                          ("203.0.113.5", "pc.mydomain.com", False)]:
        verdict = check_relay(rcpt("<a@foreign.example>"), client_may_relay=access.client_relays(ip, host),
                              relay_domains=frozenset(), access=access)
        assert verdict == (ACCEPTED if may else REFUSED), (ip, host)
    # ...while mail *to* mydomain.com is accepted from anyone.
    assert check("<a@mydomain.com>", trusted=False, access=access, domains=frozenset()) == ACCEPTED


# --- normalize_relay_domains --------------------------------------------------------------------

def test_normalize_relay_domains() -> None:
    assert normalize_relay_domains(["Example.COM.", ".Sub.Example.com", "[IPv6:2001:DB8::1]"]) == frozenset(
        {"example.com", ".sub.example.com", "[ipv6:2001:db8:0:0:0:0:0:1]"})


@pytest.mark.parametrize("bad", ["", ".", "a..b", "exa mple.com", ".[192.0.2.1]", "b\u00fccher.example"])
def test_normalize_relay_domains_refuses_bad_entries(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_relay_domains(["ok.example", bad])


# --- property ---------------------------------------------------------------------------------

labels = st.sampled_from(["local", "example", "sub", "x"])
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
locals_ = st.sampled_from(["u", "u%x.example", "x.example!u", "u+tag", '"u@x.example"', '"u v"'])


@given(local=locals_, domain=domains, routed=st.booleans(), trusted=st.booleans(),
       entries=st.frozensets(st.one_of(domains, domains.map(lambda d: "." + d)), max_size=4))
def test_untrusted_clients_get_only_plain_mail_for_our_domains(
        local: str, domain: str, routed: bool, trusted: bool, entries: frozenset[str]) -> None:
    path = f"<{'@hop.example:' if routed else ''}{local}@{domain}>"
    verdict = check(path, trusted=trusted, domains=entries)
    labels_ = domain.split(".")
    ours = domain in entries or any("." + ".".join(labels_[i:]) in entries for i in range(1, len(labels_)))
    plain = not routed and not any(ch in local for ch in "%!@")
    assert verdict == (ACCEPTED if trusted or (ours and plain) else REFUSED)
