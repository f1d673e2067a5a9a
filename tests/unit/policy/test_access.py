"""Tests for vipd.policy.access: the sendmail access map's syntax, errors and lookup order."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vipd.policy.access import (
    ACCESS_DENIED,
    CHECK_CLIENT,
    CHECK_RECIPIENT,
    CHECK_SENDER,
    RECIPIENT_DISABLED,
    AccessError,
    AccessMap,
    load_access,
    normalize_domain,
    parse_access,
)
from vipd.policy.verdict import Verdict
from vipd.smtp.commands import Address, parse_path
from vipd.smtp.replies import Reply

# The access map of the email-DMZ design, exactly as the operator writes it.
PAPER = """\
10              RELAY
192.168         RELAY
localhost       RELAY
mydomain.com    RELAY
10.1.1          OK
10.1.1.5        ERROR:550 Go away
spammer.com     ERROR:550 We do not accept mail from spammers
user@           ERROR:550 No such user
discard.com     DISCARD
"""


@pytest.fixture
def paper() -> AccessMap:
    return parse_access(PAPER, "access")


def addr(text: str) -> Address:
    address = parse_path(text, allow_null=True, allow_postmaster=True)
    assert address is not None, text
    return address


def errors_of(text: str, source: str = "acc") -> list[str]:
    with pytest.raises(AccessError) as caught:
        parse_access(text, source)
    return caught.value.errors


def kind(verdict: Verdict | None) -> str | None:
    return None if verdict is None else verdict.kind


# --- the operator's file ------------------------------------------------------------------------

def test_paper_file_loads_every_line(paper: AccessMap) -> None:
    assert len(paper) == 9


def test_most_specific_ip_entry_wins(paper: AccessMap) -> None:
    assert paper.lookup_client("10.1.1.5") == Verdict(
        "reject", Reply(550, "5.7.1", "Go away"), CHECK_CLIENT)
    assert paper.lookup_client("10.1.1.6") == Verdict("ok", None, CHECK_CLIENT)
    assert paper.lookup_client("10.2.3.4") == Verdict("relay", None, CHECK_CLIENT)
    assert kind(paper.lookup_client("192.168.40.2")) == "relay"


def test_unlisted_client_has_no_entry(paper: AccessMap) -> None:
    assert paper.lookup_client("172.16.0.1") is None
    assert paper.lookup_client("192.169.0.1") is None     # 192.168 is a prefix of octets, not text
    assert paper.lookup_client("110.1.1.5") is None


def test_client_host_name_and_parent_domains(paper: AccessMap) -> None:
    assert kind(paper.lookup_client("127.0.0.1", "localhost")) == "relay"
    assert kind(paper.lookup_client("198.51.100.7", "mx1.spammer.com")) == "reject"
    assert kind(paper.lookup_client("198.51.100.7", "SPAMMER.COM.")) == "reject"
    assert kind(paper.lookup_client("198.51.100.7", "mail.mydomain.com")) == "relay"
    assert paper.lookup_client("198.51.100.7", "notspammer.com") is None


def test_client_name_is_looked_up_before_the_address(paper: AccessMap) -> None:
    # sendmail's Basic_check_relay: $>D <client_name>, and only if nothing is found $>A <client_addr>.
    assert kind(paper.lookup_client("10.1.1.5", "gw.mydomain.com")) == "relay"
    assert kind(paper.lookup_client("10.1.1.5", "unknown.example")) == "reject"


def test_paper_senders(paper: AccessMap) -> None:
    assert paper.lookup_sender(addr("<bob@spammer.com>")) == Verdict(
        "reject", Reply(550, "5.7.1", "We do not accept mail from spammers"), CHECK_SENDER)
    assert kind(paper.lookup_sender(addr("<bob@deep.sub.spammer.com>"))) == "reject"
    assert kind(paper.lookup_sender(addr("<user@anywhere.example>"))) == "reject"
    assert kind(paper.lookup_sender(addr("<bob@discard.com>"))) == "discard"
    assert kind(paper.lookup_sender(addr("<bob@mydomain.com>"))) == "relay"
    assert paper.lookup_sender(addr("<bob@example.org>")) is None


def test_paper_recipients(paper: AccessMap) -> None:
    assert kind(paper.lookup_recipient(addr("<user@mydomain.com>"))) == "reject"
    assert kind(paper.lookup_recipient(addr("<bob@spammer.com>"))) == "reject"
    assert paper.lookup_recipient(addr("<bob@mydomain.com>")) == Verdict("relay", None, CHECK_RECIPIENT)
    assert paper.lookup_recipient(addr("<bob@example.org>")) is None


def test_paper_relay_permission_is_host_only(paper: AccessMap) -> None:
    assert paper.client_relays("10.2.3.4")
    assert paper.client_relays("192.168.0.9")
    assert not paper.client_relays("10.1.1.6")            # 10.1.1 OK is more specific: OK < RELAY
    assert not paper.client_relays("10.1.1.5")
    assert paper.client_relays("127.0.0.1", "localhost")
    assert paper.client_relays("203.0.113.9", "mydomain.com")
    assert not paper.client_relays("203.0.113.9", "mail.mydomain.com")   # relay_hosts_only
    assert not paper.client_relays("203.0.113.9", "evilmydomain.com")
    assert not paper.client_relays("203.0.113.9")


def test_relays_to_matches_the_exact_domain_only(paper: AccessMap) -> None:
    assert paper.relays_to("mydomain.com")
    assert paper.relays_to("MyDomain.COM.")
    assert not paper.relays_to("sub.mydomain.com")
    assert not paper.relays_to("spammer.com")
    assert not paper.relays_to("")


# --- tags -------------------------------------------------------------------------------------

def test_tagged_entries_apply_only_to_their_lookup() -> None:
    amap = parse_access("From:a.example REJECT\nTo:b.example REJECT\nConnect:c.example REJECT\n", "t")
    assert kind(amap.lookup_sender(addr("<x@a.example>"))) == "reject"
    assert amap.lookup_recipient(addr("<x@a.example>")) is None
    assert amap.lookup_client("192.0.2.1", "a.example") is None
    assert kind(amap.lookup_recipient(addr("<x@b.example>"))) == "reject"
    assert amap.lookup_sender(addr("<x@b.example>")) is None
    assert kind(amap.lookup_client("192.0.2.1", "c.example")) == "reject"
    assert amap.lookup_sender(addr("<x@c.example>")) is None


def test_untagged_entries_apply_to_every_lookup() -> None:
    amap = parse_access("all.example REJECT\n", "t")
    assert kind(amap.lookup_sender(addr("<x@all.example>"))) == "reject"
    assert kind(amap.lookup_recipient(addr("<x@all.example>"))) == "reject"
    assert kind(amap.lookup_client("192.0.2.1", "all.example")) == "reject"


def test_tagged_entry_is_tried_before_untagged_for_the_same_key() -> None:
    amap = parse_access("x.example REJECT\nFrom:x.example OK\n", "t")
    assert kind(amap.lookup_sender(addr("<a@x.example>"))) == "ok"
    assert kind(amap.lookup_recipient(addr("<a@x.example>"))) == "reject"


def test_each_level_tries_both_before_walking_up() -> None:
    # sendmail's LookUpDomain: Tag:key, key, then the parent. A specific untagged entry beats a
    # tagged parent.
    amap = parse_access("From:example.com REJECT\nok.example.com OK\n", "t")
    assert kind(amap.lookup_sender(addr("<a@ok.example.com>"))) == "ok"
    assert kind(amap.lookup_sender(addr("<a@bad.example.com>"))) == "reject"


def test_tags_and_keys_are_case_insensitive() -> None:
    amap = parse_access("cOnNeCt:Host.EXAMPLE relay\nFROM:Bob@Example.ORG error:550 no\n", "t")
    assert kind(amap.lookup_client("192.0.2.1", "host.example")) == "relay"
    assert kind(amap.lookup_sender(addr("<BOB@example.org>"))) == "reject"


# --- sender / recipient order -------------------------------------------------------------------

def test_sender_order_is_full_address_then_user_then_domain() -> None:
    amap = parse_access(
        "From:bob@x.example OK\nFrom:bob@ DISCARD\nFrom:x.example REJECT\n", "t")
    assert kind(amap.lookup_sender(addr("<bob@x.example>"))) == "ok"
    assert kind(amap.lookup_sender(addr("<bob@y.x.example>"))) == "discard"   # user@ before domain
    assert kind(amap.lookup_sender(addr("<ann@y.x.example>"))) == "reject"


def test_plus_detail_tries_user_plus_star_then_user() -> None:
    amap = parse_access("From:ann+*@x.example OK\nFrom:ann@x.example REJECT\nFrom:bob@ REJECT\n", "t")
    assert kind(amap.lookup_sender(addr("<ann+news@x.example>"))) == "ok"
    assert kind(amap.lookup_sender(addr("<ann@x.example>"))) == "reject"
    assert kind(amap.lookup_sender(addr("<bob+dodge@y.example>"))) == "reject"
    assert amap.lookup_sender(addr("<bobby@y.example>")) is None


def test_quoted_local_part_matches_its_plain_form() -> None:
    amap = parse_access("From:bob@ REJECT\n", "t")
    assert kind(amap.lookup_sender(addr('<"bob"@x.example>'))) == "reject"
    assert amap.lookup_sender(addr('<"bob smith"@x.example>')) is None


def test_null_sender_is_never_looked_up() -> None:
    amap = parse_access("user@ REJECT\n", "t")
    assert amap.lookup_sender(addr("<>")) is None


def test_recipient_user_entries_apply_only_to_our_domains() -> None:
    amap = parse_access("To:abuse@ REJECT\n", "t")
    assert kind(amap.lookup_recipient(addr("<abuse@ours.example>"))) == "reject"
    assert kind(amap.lookup_recipient(addr("<abuse@ours.example>"), local=True)) == "reject"
    assert amap.lookup_recipient(addr("<abuse@theirs.example>"), local=False) is None


def test_recipient_without_domain_is_looked_up_as_user() -> None:
    amap = parse_access("To:postmaster@ DISCARD\n", "t")
    assert kind(amap.lookup_recipient(addr("<postmaster>"), local=False)) == "discard"


def test_reject_reply_depends_on_the_lookup() -> None:
    amap = parse_access("bad.example REJECT\n", "t")
    assert amap.lookup_client("192.0.2.1", "bad.example") == Verdict("reject", ACCESS_DENIED, CHECK_CLIENT)
    assert amap.lookup_sender(addr("<a@bad.example>")) == Verdict("reject", ACCESS_DENIED, CHECK_SENDER)
    assert amap.lookup_recipient(addr("<a@bad.example>")) == Verdict(
        "reject", RECIPIENT_DISABLED, CHECK_RECIPIENT)
    assert ACCESS_DENIED == Reply(550, "5.7.1", "Access denied")


# --- SKIP -------------------------------------------------------------------------------------

def test_skip_exempts_a_subnet() -> None:
    amap = parse_access("Connect:128.32 RELAY\nConnect:128.32.2 SKIP\n", "t")
    assert kind(amap.lookup_client("128.32.3.1")) == "relay"
    assert amap.lookup_client("128.32.2.9") is None
    assert not amap.client_relays("128.32.2.9")


def test_skip_exempts_a_subdomain() -> None:
    amap = parse_access("From:cyber.example REJECT\nFrom:okay.cyber.example SKIP\n", "t")
    assert kind(amap.lookup_sender(addr("<a@bad.cyber.example>"))) == "reject"
    assert amap.lookup_sender(addr("<a@x.okay.cyber.example>")) is None


def test_skip_on_the_name_still_lets_the_address_decide() -> None:
    # SKIP ends the current search (the name), not the whole lookup (sendmail's D, then A).
    amap = parse_access("Connect:host.example SKIP\nConnect:192.0.2 REJECT\n", "t")
    assert kind(amap.lookup_client("192.0.2.1", "host.example")) == "reject"


# --- IPv6, literals -----------------------------------------------------------------------------

def test_ipv6_network_prefixes() -> None:
    amap = parse_access("IPv6:2001:db8 RELAY\nConnect:IPv6:2002:c0a8:02c7 REJECT\n"
                        "IPv6:2001:db8::23f4 ERROR:550 this one\n", "t")
    assert kind(amap.lookup_client("2001:db8::1")) == "relay"
    assert kind(amap.lookup_client("2001:0DB8:0:0:1::5")) == "relay"
    assert kind(amap.lookup_client("2002:c0a8:2c7:ffff::1")) == "reject"   # 02c7 == 2c7
    assert amap.lookup_client("2001:db8::23f4").reply.text == "this one"  # type: ignore[union-attr]
    assert amap.lookup_client("2001:db9::1") is None
    assert amap.client_relays("2001:db8:1::1")


def test_ipv4_mapped_clients_match_ipv4_entries(paper: AccessMap) -> None:
    assert kind(paper.lookup_client("::ffff:10.1.1.5")) == "reject"
    assert paper.client_relays("::ffff:10.9.9.9")


def test_bracketed_address_matches_only_clients_without_a_name() -> None:
    amap = parse_access("Connect:[192.0.2.7] OK\nConnect:[198.51.100] REJECT\n", "t")
    assert kind(amap.lookup_client("192.0.2.7")) == "ok"
    assert amap.lookup_client("192.0.2.7", "named.example") is None
    assert kind(amap.lookup_client("198.51.100.3")) == "reject"


def test_literal_domains_walk_their_networks() -> None:
    amap = parse_access("From:[192.0.2] OK\nFrom:[IPv6:2001:db8::1] REJECT\n", "t")
    assert kind(amap.lookup_sender(addr("<a@[192.0.2.44]>"))) == "ok"
    assert kind(amap.lookup_sender(addr("<a@[IPv6:2001:DB8:0::1]>"))) == "reject"
    assert amap.lookup_sender(addr("<a@[192.0.3.1]>")) is None


def test_bad_client_address_raises_value_error(paper: AccessMap) -> None:
    with pytest.raises(ValueError):
        paper.lookup_client("not-an-ip")


# --- values -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected_kind", "reply"), [
    ("ERROR:550 Go away", "reject", Reply(550, "5.7.1", "Go away")),
    ('ERROR:"550 Go away"', "reject", Reply(550, "5.7.1", "Go away")),
    ("ERROR:5.7.0:550 Go away", "reject", Reply(550, "5.7.0", "Go away")),
    ('ERROR:5.7.0:"550 Go away"', "reject", Reply(550, "5.7.0", "Go away")),
    ('ERROR:"5.7.0:550 Go away"', "reject", Reply(550, "5.7.0", "Go away")),
    ("ERROR:450 Try later", "tempfail", Reply(450, "4.7.1", "Try later")),
    ("ERROR:4.2.2:450 mailbox full", "tempfail", Reply(450, "4.2.2", "mailbox full")),
    ("ERROR:421 Closing", "disconnect", Reply(421, "4.7.1", "Closing")),
    ("error:553", "reject", Reply(553, "5.7.1", "Access denied")),
    ('"550 deprecated form"', "reject", Reply(550, "5.7.1", "deprecated form")),
    ("554 also deprecated", "reject", Reply(554, "5.7.1", "also deprecated")),
    ("ERROR:550 text with # and \"quotes\"", "reject", Reply(550, "5.7.1", 'text with # and "quotes"')),
])
def test_error_values(value: str, expected_kind: str, reply: Reply) -> None:
    amap = parse_access(f"From:x.example {value}\n", "t")
    verdict = amap.lookup_sender(addr("<a@x.example>"))
    assert verdict == Verdict(expected_kind, reply, CHECK_SENDER)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "expected_kind"), [
    ("OK", "ok"), ("ok", "ok"), ("RELAY", "relay"), ("Relay", "relay"), ("REJECT", "reject"),
    ("DISCARD", "discard"),
])
def test_keyword_values(value: str, expected_kind: str) -> None:
    amap = parse_access(f"x.example\t{value}\n", "t")
    assert kind(amap.lookup_sender(addr("<a@x.example>"))) == expected_kind


# --- syntax and errors ---------------------------------------------------------------------------

def test_comments_blank_lines_and_crlf_are_ignored() -> None:
    amap = parse_access("# comment\r\n\r\n   # indented comment\r\n  \t\r\nx.example REJECT\r\n", "t")
    assert len(amap) == 1
    assert kind(amap.lookup_sender(addr("<a@x.example>"))) == "reject"


def test_empty_text_is_an_empty_map() -> None:
    amap = parse_access("", "t")
    assert len(amap) == 0
    assert amap.lookup_client("192.0.2.1", "any.example") is None


def test_every_bad_line_is_reported_with_source_and_line() -> None:
    errors = errors_of("good.example OK\nbad..example OK\n\nx.example MAYBE\n10.1 RELAY extra\n", "my/access")
    assert len(errors) == 3
    assert errors[0].startswith("my/access:2: bad key")
    assert errors[1].startswith("my/access:4: unknown value")
    assert errors[2].startswith("my/access:5: unexpected text after RELAY")


@pytest.mark.parametrize(("line", "fragment"), [
    ("lonely.example", "missing value"),
    ("10.1.256 RELAY", "IPv4 octets"),
    ("10.01 RELAY", "IPv4 octets"),
    ("1.2.3.4.5 RELAY", "expected an IP network"),
    ("IPv6:2001:zz RELAY", "IPv6"),
    ("IPv6:::ffff:10.1.1.5 RELAY", "IPv6"),
    ("[192.0.2.1 OK", "address literal"),
    ("Spam:abuse@ OK", "unsupported tag"),
    ("Connect: OK", "nothing after the tag"),
    ("Connect:bob@x.example REJECT", "not e-mail addresses"),
    ("From:10.1.2.3 OK", "only matches Connect:"),
    ("To:IPv6:2001:db8 OK", "only matches Connect:"),
    ("@x.example REJECT", "@domain is not access map syntax"),
    (".x.example REJECT", "lookupdotdomain"),
    ("From:<> REJECT", "null sender"),
    ("bob@ SKIP", "SKIP is only for"),
    ("bob@x.example SKIP", "SKIP is only for"),
    ("x.example QUARANTINE:hold", "QUARANTINE"),
    ("x.example ERROR:250 fine", "not 4xx or 5xx"),
    ("x.example ERROR:5.7.1:450 mixed", "does not match reply code"),
    ("x.example ERROR:4.7.1:550 mixed", "does not match reply code"),
    ('x.example ERROR:"550 unbalanced', "unbalanced quote"),
    ("x.example ERROR:go away", "expected an SMTP reply code"),
    ("x.example ERROR:", "expected an SMTP reply code"),
    ("x.example ERROR:550 " + "x" * 481, "longer than"),
    ("x.example ERROR:550 bad\x00text", "control or non-ASCII"),
    ("x.example ERROR:550 caf\u00e9", "control or non-ASCII"),
    ("b\u00fccher.example OK", "control or non-ASCII"),
    ("x.example RELAY # trailing comment", "unexpected text after RELAY"),
])
def test_bad_lines(line: str, fragment: str) -> None:
    errors = errors_of(f"ok.example OK\n{line}\n")
    assert len(errors) == 1
    assert errors[0].startswith("acc:2: ")
    assert fragment in errors[0]


def test_duplicate_keys_are_errors_but_tags_make_keys_distinct() -> None:
    errors = errors_of("x.example OK\nX.Example. REJECT\n")
    assert errors == ["acc:2: duplicate key (first on line 1)"]
    amap = parse_access("x.example OK\nFrom:x.example REJECT\nTo:x.example RELAY\n", "t")
    assert len(amap) == 3


def test_a_bad_value_does_not_hide_a_bad_key() -> None:
    errors = errors_of("bad..key NOPE\n")
    assert len(errors) == 2


def test_access_error_is_a_value_error_with_all_errors_in_its_message() -> None:
    with pytest.raises(ValueError) as caught:
        parse_access("a..b OK\nc..d OK\n", "f")
    assert str(caught.value) == "\n".join(caught.value.errors)  # type: ignore[attr-defined]


def test_load_access_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "access"
    path.write_text(PAPER, encoding="utf-8")
    amap = load_access(path)
    assert amap.source == str(path)
    assert kind(amap.lookup_client("10.1.1.5")) == "reject"


def test_load_access_reports_the_path_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "access"
    path.write_text("x.example NOPE\n", encoding="utf-8")
    with pytest.raises(AccessError) as caught:
        load_access(path)
    assert caught.value.errors[0].startswith(f"{path}:1: ")
    with pytest.raises(AccessError) as missing:
        load_access(tmp_path / "absent")
    assert "cannot read" in missing.value.errors[0]
    (tmp_path / "latin1").write_bytes(b"caf\xe9.example OK\n")
    with pytest.raises(AccessError) as binary:
        load_access(tmp_path / "latin1")
    assert "not UTF-8" in binary.value.errors[0]


def test_normalize_domain() -> None:
    assert normalize_domain("Example.COM.") == "example.com"
    assert normalize_domain("[IPv6:2001:DB8::1]") == "[ipv6:2001:db8:0:0:0:0:0:1]"
    assert normalize_domain("[192.0.2.1]") == "[192.0.2.1]"


# --- properties ---------------------------------------------------------------------------------
# A reference model small enough to be obviously right: the table is a dict of lower-case
# (tag, key) strings, and each lookup is the list of searches sendmail documents.

# Two symbols each, so that keys collide with each other and with the queries.
_OCTETS = ["1", "2"]
_LABELS = ["a", "b"]
_VALUES = ["OK", "RELAY", "REJECT", "DISCARD", "SKIP", "ERROR:450 t", "ERROR:553 t"]
_EXPECT = {"OK": ("ok", None), "RELAY": ("relay", None), "REJECT": ("reject", 550),
           "DISCARD": ("discard", None), "ERROR:450 t": ("tempfail", 450),
           "ERROR:553 t": ("reject", 553)}

ipv4_prefix = st.lists(st.sampled_from(_OCTETS), min_size=1, max_size=4).map(".".join)
domain = st.lists(st.sampled_from(_LABELS), min_size=1, max_size=3).map(".".join)
ip_key = st.tuples(st.sampled_from(["", "connect:"]), ipv4_prefix)
literal_key = st.tuples(st.sampled_from(["", "connect:", "from:", "to:"]),
                        ipv4_prefix.map(lambda p: f"[{p}]"))
name_key = st.tuples(st.sampled_from(["", "connect:", "from:", "to:"]), domain)
user_key = st.tuples(st.sampled_from(["", "from:", "to:"]), st.sampled_from(["u@", "v@", "u+*@"]))
full_key = st.tuples(st.sampled_from(["", "from:", "to:"]),
                     st.tuples(st.sampled_from(["u", "v", "u+*"]), domain).map("@".join))
host_keys = st.one_of(ip_key, literal_key, name_key)
address_keys = st.one_of(user_key, full_key)

tables = st.tuples(
    st.dictionaries(host_keys, st.sampled_from([*_VALUES, "SKIP", "SKIP"]), min_size=4, max_size=30),
    st.dictionaries(address_keys, st.sampled_from([v for v in _VALUES if v != "SKIP"]),
                    min_size=2, max_size=12),
).map(lambda pair: {**pair[0], **pair[1]})


def render(table: dict[tuple[str, str], str], upper: bool) -> str:
    lines = []
    for (tag, key), value in table.items():
        text = tag + key
        lines.append(f"{text.upper() if upper else text}\t{value}")
    return "\n".join(lines) + "\n"


def ref_search(table: dict[tuple[str, str], str], tag: str, keys: list[str]) -> str | None:
    for key in keys:
        for t in (tag, ""):
            value = table.get((t, key))
            if value is not None:
                return None if value == "SKIP" else value
    return None


def ref_parents(name: str) -> list[str]:
    labels = name.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


def ref_ip_prefixes(ip: str) -> list[str]:
    octets = ip.split(".")
    return [".".join(octets[:n]) for n in (4, 3, 2, 1)]


def ref_client(table: dict[tuple[str, str], str], ip: str, host: str | None) -> str | None:
    names = ref_parents(host) if host else [f"[{p}]" for p in ref_ip_prefixes(ip)]
    return ref_search(table, "connect:", names) or ref_search(table, "connect:", ref_ip_prefixes(ip))


def ref_address(table: dict[tuple[str, str], str], tag: str, local: str, dom: str, user: bool) -> str | None:
    forms = [local] + ([local.split("+")[0] + "+*", local.split("+")[0]] if "+" in local else [])
    return (ref_search(table, tag, [f"{f}@{dom}" for f in forms])
            or (ref_search(table, tag, [f"{f}@" for f in forms]) if user else None)
            or ref_search(table, tag, ref_parents(dom)))


def ref_exact(table: dict[tuple[str, str], str], tag: str, key: str) -> str | None:
    value = table.get((tag, key))
    return value if value is not None else table.get(("", key))


def ref_client_relays(table: dict[tuple[str, str], str], ip: str, host: str | None) -> bool:
    if ref_search(table, "connect:", ref_ip_prefixes(ip)) == "RELAY":
        return True
    return host is not None and ref_exact(table, "connect:", host) == "RELAY"


def outcome(verdict: Verdict | None) -> tuple[str, int | None] | None:
    if verdict is None:
        return None
    return verdict.kind, (verdict.reply.code if verdict.reply else None)


def expected(value: str | None) -> tuple[str, int | None] | None:
    return None if value is None else _EXPECT[value]


ips = st.lists(st.sampled_from(_OCTETS + ["3"]), min_size=4, max_size=4).map(".".join)
names = st.lists(st.sampled_from(_LABELS + ["c"]), min_size=1, max_size=4).map(".".join)
locals_ = st.sampled_from(["u", "v", "w", "u+x"])


def near_ip(table: dict[tuple[str, str], str]) -> st.SearchStrategy[str]:
    """Random addresses, and addresses inside the table's networks, so that entries match."""
    prefixes = sorted({key.strip("[]") for _, key in table if key.strip("[")[:1].isdigit()})
    if not prefixes:
        return ips
    return ips | st.sampled_from(prefixes).flatmap(
        lambda p: st.lists(st.sampled_from(_OCTETS + ["3"]), min_size=4 - p.count(".") - 1,
                           max_size=4 - p.count(".") - 1).map(lambda rest: ".".join([p, *rest])))


def near_name(table: dict[tuple[str, str], str]) -> st.SearchStrategy[str]:
    """Random names, and names at or below the table's domains."""
    known = sorted({key.rpartition("@")[2] for _, key in table
                    if key[:1].isalpha() and not key.endswith("@")})
    if not known:
        return names
    return names | st.tuples(st.lists(st.sampled_from(_LABELS + ["c"]), max_size=2),
                             st.sampled_from(known)).map(lambda t: ".".join([*t[0], t[1]]))


@given(table=tables, upper=st.booleans(), data=st.data())
def test_client_lookup_agrees_with_reference(table: dict[tuple[str, str], str], upper: bool,
                                             data: st.DataObject) -> None:
    ip = data.draw(near_ip(table), label="ip")
    host = data.draw(st.none() | near_name(table), label="host")
    amap = parse_access(render(table, upper), "h")
    assert outcome(amap.lookup_client(ip, host)) == expected(ref_client(table, ip, host))
    assert amap.client_relays(ip, host) == ref_client_relays(table, ip, host)


@given(table=tables, upper=st.booleans(), local=locals_, ours=st.booleans(), data=st.data())
def test_address_lookups_agree_with_reference(table: dict[tuple[str, str], str], upper: bool,
                                              local: str, ours: bool, data: st.DataObject) -> None:
    dom = data.draw(near_name(table), label="domain")
    amap = parse_access(render(table, upper), "h")
    address = addr(f"<{local}@{dom}>")
    assert outcome(amap.lookup_sender(address)) == expected(ref_address(table, "from:", local, dom, True))
    assert outcome(amap.lookup_recipient(address, local=ours)) == expected(
        ref_address(table, "to:", local, dom, ours))
    assert amap.relays_to(dom) == (ref_exact(table, "to:", dom) == "RELAY")


_FRAGMENTS = ["Connect:", "From:", "To:", "IPv6:", "::", ":", "[", "]", "ERROR:", '"', "5.7.1:",
              "550", "450", "421", "@", "10.1", "256", "a.example", "OK", "RELAY", "SKIP", "REJECT",
              " ", "\t", "\n", "\r", "#", "+", "*", "\x00", "\u00fc", "\u2028", "\x85", ".", "0"]


@given(st.one_of(st.text(), st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map("".join)))
def test_parse_access_raises_only_access_error(text: str) -> None:
    try:
        amap = parse_access(text, "fuzz")
    except AccessError as exc:
        assert exc.errors
        assert all(error.startswith("fuzz:") for error in exc.errors)
    else:
        assert len(amap) <= text.count("\n") + 1
