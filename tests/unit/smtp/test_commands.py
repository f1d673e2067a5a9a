"""parse_command / parse_path: RFC 5321 4.1.1 and 4.1.2 syntax, RFC 1870 SIZE, RFC 6152 BODY."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vipd.smtp import replies
from vipd.smtp.commands import (NULL_PATH, Address, Command, Data, Ehlo, Expn, Helo, Help, MailFrom,
                                Noop, Quit, RcptTo, Rset, StartTls, Unknown, Vrfy, Xclient, parse_command,
                                parse_path)
from vipd.smtp.replies import Reply

MAX = 10_000_000


def parse(line: str | bytes, max_message_bytes: int = MAX) -> Command | Reply:
    raw = line.encode("latin-1") if isinstance(line, str) else line
    return parse_command(raw, max_message_bytes=max_message_bytes)


# --- HELO / EHLO ------------------------------------------------------------------------------
@pytest.mark.parametrize("line, expected", [
    ("HELO mx.example.org", Helo("mx.example.org")),
    ("helo mx.example.org", Helo("mx.example.org")),
    ("EHLO mx.example.org", Ehlo("mx.example.org")),
    ("eHlO MX.Example.ORG", Ehlo("MX.Example.ORG")),
    ("EHLO [192.0.2.1]", Ehlo("[192.0.2.1]")),
    ("EHLO [IPv6:2001:db8::1]", Ehlo("[IPv6:2001:db8::1]")),
    ("EHLO   mx.example.org  ", Ehlo("mx.example.org")),
])
def test_helo_ehlo_accepted(line, expected):
    assert parse(line) == expected


@pytest.mark.parametrize("line", ["HELO", "EHLO", "HELO ", "EHLO    ", "EHLO a b", "HELO mx.example.org extra"])
def test_helo_ehlo_syntax(line):
    assert parse(line) == replies.HELO_SYNTAX
    assert parse(line).code == 501


# --- MAIL FROM ---------------------------------------------------------------------------------
def test_mail_plain():
    cmd = parse("MAIL FROM:<alice@example.org>")
    assert cmd == MailFrom(Address("alice", "example.org", "alice@example.org"))
    assert cmd.size is None and cmd.body is None and cmd.params == ()


def test_mail_null_path():
    cmd = parse("MAIL FROM:<>")
    assert isinstance(cmd, MailFrom)
    assert cmd.address == NULL_PATH and cmd.address.is_null and str(cmd.address) == "<>"


def test_mail_verb_and_keyword_case_insensitive():
    assert parse("mail from:<a@b.example>") == parse("MAIL FROM:<a@b.example>")
    assert isinstance(parse("Mail From:<a@b.example>"), MailFrom)


def test_mail_postmaster_is_not_a_sender():
    assert parse("MAIL FROM:<postmaster>") == replies.BAD_SENDER_ADDRESS


@pytest.mark.parametrize("line", [
    "MAIL FROM: <alice@example.org>",        # space after the colon (common, tolerated)
    "MAIL FROM:   <alice@example.org>",
    "MAIL FROM:alice@example.org",           # brackets missing (tolerated)
    "MAIL FROM: alice@example.org",
])
def test_mail_tolerated_forms(line):
    cmd = parse(line)
    assert isinstance(cmd, MailFrom)
    assert (cmd.address.local, cmd.address.domain, cmd.address.text) == ("alice", "example.org",
                                                                         "alice@example.org")


def test_mail_missing_brackets_with_params():
    cmd = parse("MAIL FROM:alice@example.org SIZE=10")
    assert isinstance(cmd, MailFrom) and cmd.size == 10 and cmd.address.text == "alice@example.org"


def test_mail_source_route_accepted_and_dropped():
    cmd = parse("MAIL FROM:<@relay1.example,@relay2.example:user@final.example>")
    assert isinstance(cmd, MailFrom)
    assert cmd.address.had_route
    assert (cmd.address.local, cmd.address.domain, cmd.address.text) == ("user", "final.example",
                                                                         "user@final.example")


def test_rcpt_source_route_accepted():
    cmd = parse("RCPT TO:<@a.example,@b.example:u@c.example>")
    assert isinstance(cmd, RcptTo)
    assert cmd.address.had_route and cmd.address.text == "u@c.example" and cmd.address.domain == "c.example"


def test_plain_address_has_no_route():
    assert parse("RCPT TO:<u@c.example>").address.had_route is False


@pytest.mark.parametrize("local", [
    '"john doe"',
    '"a@b"',                  # '@' inside quotes: the domain is after the last '@'
    '"a>b"',                  # '>' inside quotes must not close the path
    '"with \\" quote"',
    '"\\\\"',
    '""',
])
def test_quoted_local_parts(local):
    cmd = parse(f"MAIL FROM:<{local}@example.org> SIZE=5")
    assert isinstance(cmd, MailFrom), cmd
    assert cmd.address.local == local
    assert cmd.address.domain == "example.org"
    assert cmd.address.text == f"{local}@example.org"
    assert cmd.size == 5


@pytest.mark.parametrize("domain, lowered", [
    ("[192.0.2.1]", "[192.0.2.1]"),
    ("[IPv6:2001:db8::1]", "[ipv6:2001:db8::1]"),
    ("[IPv6:::ffff:192.0.2.1]", "[ipv6:::ffff:192.0.2.1]"),
])
def test_address_literals(domain, lowered):
    cmd = parse(f"RCPT TO:<user@{domain}>")
    assert isinstance(cmd, RcptTo)
    assert cmd.address.domain == lowered
    assert cmd.address.text == f"user@{domain}"


def test_domain_lowercased_text_kept():
    cmd = parse("MAIL FROM:<Alice@MiXeD.Example.ORG>")
    assert cmd.address.domain == "mixed.example.org"
    assert cmd.address.local == "Alice"                      # local parts are case-sensitive
    assert cmd.address.text == "Alice@MiXeD.Example.ORG"


def test_trailing_dot_dropped_from_domain():
    cmd = parse("RCPT TO:<u@example.org.>")
    assert isinstance(cmd, RcptTo)
    assert cmd.address.domain == "example.org"


@pytest.mark.parametrize("line, expected", [
    ("MAIL FROM:<alice>", replies.BAD_SENDER_ADDRESS),
    ("MAIL FROM:<@example.org>", replies.BAD_SENDER_ADDRESS),
    ("MAIL FROM:<alice@>", replies.BAD_SENDER_ADDRESS),
    ("MAIL FROM:<alice@example.org", replies.BAD_SENDER_ADDRESS),
    ("MAIL FROM:<a..b@example.org>", replies.BAD_SENDER_ADDRESS),
    ("MAIL FROM:<.a@example.org>", replies.BAD_SENDER_ADDRESS),
    ("MAIL FROM:<a b@example.org>", replies.BAD_SENDER_ADDRESS),
    ("MAIL FROM:<a@-bad.example>", replies.BAD_SENDER_ADDRESS),
    ("MAIL FROM:<a@exa mple.org>", replies.BAD_SENDER_ADDRESS),
    ("MAIL FROM:<a@[192.0.2.1>", replies.BAD_SENDER_ADDRESS),
    ("MAIL FROM:<\"unclosed@example.org>", replies.BAD_SENDER_ADDRESS),
    ("MAIL FROM:alice", replies.MAIL_SYNTAX),
    ("MAIL FROM:", replies.MAIL_SYNTAX),
    ("MAIL", replies.MAIL_SYNTAX),
    ("MAIL TO:<a@b.example>", replies.MAIL_SYNTAX),
    ("MAIL FROM <a@b.example>", replies.MAIL_SYNTAX),
    ("MAIL FROM:<a@b.example>SIZE=1", replies.SYNTAX),      # parameters need a space
])
def test_mail_refused(line, expected):
    assert parse(line) == expected


def test_mail_domain_too_long():
    label = "a" * 60
    domain = ".".join([label] * 5)  # 304 octets
    assert parse(f"MAIL FROM:<u@{domain}>") == replies.BAD_SENDER_ADDRESS


# --- RCPT TO ----------------------------------------------------------------------------------
def test_rcpt_plain():
    assert parse("RCPT TO:<bob@example.net>") == RcptTo(Address("bob", "example.net", "bob@example.net"))


@pytest.mark.parametrize("path", ["<postmaster>", "<Postmaster>", "<POSTMASTER>", "postmaster"])
def test_rcpt_postmaster(path):
    cmd = parse(f"RCPT TO:{path}")
    assert isinstance(cmd, RcptTo)
    assert cmd.address.domain == ""
    assert cmd.address.local.lower() == "postmaster" and not cmd.address.is_null


def test_rcpt_postmaster_at_domain_is_an_ordinary_address():
    cmd = parse("RCPT TO:<postmaster@Example.org>")
    assert cmd.address.domain == "example.org" and cmd.address.local == "postmaster"


@pytest.mark.parametrize("line, expected", [
    ("RCPT TO:<>", replies.BAD_RCPT_ADDRESS),               # null path is for MAIL only
    ("RCPT TO:<bob>", replies.BAD_RCPT_ADDRESS),
    ("RCPT TO:bob", replies.RCPT_SYNTAX),
    ("RCPT TO:", replies.RCPT_SYNTAX),
    ("RCPT FROM:<bob@example.net>", replies.RCPT_SYNTAX),
    ("RCPT", replies.RCPT_SYNTAX),
    ("RCPT TO:<bob@example.net> NOTIFY=NEVER", replies.BAD_PARAMETER),   # DSN not offered
    ("RCPT TO:<bob@example.net> =x", replies.SYNTAX),
])
def test_rcpt_refused(line, expected):
    assert parse(line) == expected


def test_rcpt_tolerated_forms():
    for line in ("RCPT TO: <bob@example.net>", "rcpt to:bob@example.net", "RCPT TO:<bob@example.net> "):
        cmd = parse(line)
        assert isinstance(cmd, RcptTo), line
        assert cmd.address.text == "bob@example.net"


# --- ESMTP parameters -------------------------------------------------------------------------
def test_size_parameter():
    cmd = parse("MAIL FROM:<a@b.example> SIZE=1000")
    assert cmd.size == 1000 and cmd.params == (("SIZE", "1000"),)


def test_size_at_limit_ok_over_limit_refused():
    assert parse("MAIL FROM:<a@b.example> SIZE=5000", max_message_bytes=5000).size == 5000
    over = parse("MAIL FROM:<a@b.example> SIZE=5001", max_message_bytes=5000)
    assert over == replies.TOO_BIG
    assert (over.code, over.status) == (552, "5.3.4")


def test_size_case_insensitive_key():
    assert parse("MAIL FROM:<a@b.example> size=7").size == 7


@pytest.mark.parametrize("param", ["SIZE", "SIZE=", "SIZE=-1", "SIZE=+1", "SIZE=1e3", "SIZE=abc",
                                   "SIZE=" + "9" * 21])
def test_size_syntax(param):
    assert parse(f"MAIL FROM:<a@b.example> {param}") == replies.SYNTAX


def test_huge_size_within_20_digits_is_too_big():
    assert parse("MAIL FROM:<a@b.example> SIZE=" + "9" * 20) == replies.TOO_BIG


@pytest.mark.parametrize("value, expected", [("8BITMIME", "8BITMIME"), ("7BIT", "7BIT"),
                                             ("8bitmime", "8BITMIME"), ("7bit", "7BIT")])
def test_body_parameter(value, expected):
    cmd = parse(f"MAIL FROM:<a@b.example> BODY={value}")
    assert isinstance(cmd, MailFrom) and cmd.body == expected


@pytest.mark.parametrize("param", ["BODY=BINARYMIME", "BODY", "BODY=8BIT"])
def test_body_refused(param):
    assert parse(f"MAIL FROM:<a@b.example> {param}") == replies.BAD_EIGHTBIT


def test_size_and_body_together():
    cmd = parse("MAIL FROM:<> BODY=8BITMIME SIZE=12345")
    assert cmd.address.is_null and cmd.size == 12345 and cmd.body == "8BITMIME"
    assert cmd.params == (("BODY", "8BITMIME"), ("SIZE", "12345"))


@pytest.mark.parametrize("param", ["AUTH=<>", "SMTPUTF8", "RET=FULL", "ENVID=x", "X-FOO=bar"])
def test_unknown_mail_parameter_is_555(param):
    reply = parse(f"MAIL FROM:<a@b.example> {param}")
    assert reply == replies.BAD_PARAMETER
    assert (reply.code, reply.status) == (555, "5.5.4")


@pytest.mark.parametrize("params", ["=x", "SI_ZE=1", "-X=1", "SIZE=1 =2"])
def test_malformed_parameters(params):
    assert parse(f"MAIL FROM:<a@b.example> {params}") == replies.SYNTAX


# --- the other verbs --------------------------------------------------------------------------
@pytest.mark.parametrize("line, expected", [
    ("DATA", Data()), ("data", Data()), ("RSET", Rset()), ("QUIT", Quit()), ("QUIT ", Quit()),
    ("NOOP", Noop()), ("NOOP anything goes here", Noop()),
    ("HELP", Help("")), ("HELP MAIL", Help("MAIL")),
    ("VRFY alice", Vrfy("alice")), ("EXPN staff", Expn("staff")),
])
def test_simple_verbs(line, expected):
    assert parse(line) == expected


@pytest.mark.parametrize("line", ["DATA x", "RSET now", "QUIT please"])
def test_no_arguments_allowed(line):
    assert parse(line) == replies.NO_ARGUMENTS


@pytest.mark.parametrize("line", ["VRFY", "EXPN", "VRFY   "])
def test_vrfy_expn_need_an_argument(line):
    assert parse(line) == replies.SYNTAX


@pytest.mark.parametrize("verb", ["AUTH PLAIN AGFiYwBkZWY=", "ETRN x", "TURN"])
def test_known_unoffered_verbs(verb):
    cmd = parse(verb)
    assert isinstance(cmd, Unknown) and cmd.known


def test_starttls_takes_no_parameters():
    assert isinstance(parse("STARTTLS"), StartTls) and isinstance(parse("starttls"), StartTls)
    assert parse("STARTTLS now") == replies.NO_ARGUMENTS


@pytest.mark.parametrize("line", ["", "FOO", "GET / HTTP/1.1", "MAILFROM:<a@b>", "X" * 100])
def test_unknown_verbs(line):
    cmd = parse(line)
    assert isinstance(cmd, Unknown) and not cmd.known
    assert len(cmd.verb) <= 32


def test_non_ascii_refused():
    assert parse("MAIL FROM:<jos\xe9@example.org>") == replies.NON_ASCII_COMMAND
    assert parse("EHLO \xff") == replies.NON_ASCII_COMMAND
    assert parse("EHLO mx.example".encode() + "é".encode("utf-8")) == replies.NON_ASCII_COMMAND


@pytest.mark.parametrize("char", ["\x00", "\r", "\n", "\x1b", "\x7f", "\x01"])
def test_control_characters_refused(char):
    assert parse(f"NOOP a{char}b") == replies.BAD_CHARACTERS
    assert parse(f"MAIL FROM:<a{char}@b.example>") == replies.BAD_CHARACTERS


def test_xclient_parsing():
    cmd = parse("XCLIENT NAME=mx.example ADDR=192.0.2.1 helo=a+20b")
    assert isinstance(cmd, Xclient)
    assert cmd.get("NAME") == "mx.example" and cmd.get("ADDR") == "192.0.2.1"
    assert cmd.get("HELO") == "a b"                          # keys upper-cased, xtext decoded
    assert cmd.get("PORT") is None


@pytest.mark.parametrize("line", ["XCLIENT", "XCLIENT NAME", "XCLIENT =x"])
def test_xclient_syntax(line):
    assert parse(line) == replies.SYNTAX


# --- parse_path directly ----------------------------------------------------------------------
def test_parse_path_flags():
    assert parse_path("<>", allow_null=True, allow_postmaster=False) is NULL_PATH
    assert parse_path("<>", allow_null=False, allow_postmaster=True) is None
    assert parse_path("<postmaster>", allow_null=False, allow_postmaster=False) is None
    assert parse_path("<postmaster>", allow_null=False, allow_postmaster=True).text == "postmaster"
    assert parse_path("<@a.example:postmaster>", allow_null=False, allow_postmaster=True).had_route


def test_parse_path_route_with_literal():
    addr = parse_path("<@[192.0.2.1],@b.example:u@c.example>", allow_null=False, allow_postmaster=False)
    assert addr is not None and addr.had_route and addr.text == "u@c.example"


# --- never raises -----------------------------------------------------------------------------
_SMTPISH = st.text(alphabet=list('MAILFROMRCPTTOSIZEBODY:<>@"\\[]., =-+_:IPv6xy0129\t'), max_size=80)
_VERBS = st.sampled_from(["MAIL FROM:", "RCPT TO:", "HELO ", "EHLO ", "XCLIENT ", "VRFY ", "NOOP ", "",
                          "mail from: <", "RCPT TO:<@"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(line):
    result = parse(line)
    assert isinstance(result, (Command, Reply))
    if isinstance(result, Reply):
        assert 500 <= result.code < 600 and result.status.startswith("5.")


@settings(max_examples=600, deadline=None)
@given(_VERBS, _SMTPISH, st.integers(min_value=0, max_value=10**9))
def test_smtp_shaped_garbage_never_raises(verb, rest, limit):
    result = parse(verb + rest, max_message_bytes=limit)
    assert isinstance(result, (Command, Reply))
    if isinstance(result, MailFrom):
        # What was accepted is consistent: the size fits, a domain is lower case without trailing dot.
        assert result.size is None or result.size <= limit
        assert result.address.domain == result.address.domain.lower()
        assert not result.address.domain.endswith(".")
    if isinstance(result, RcptTo):
        assert not result.address.is_null


_ATOM = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=10)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(_ATOM, min_size=1, max_size=3), st.lists(_LABEL, min_size=1, max_size=4),
       st.booleans(), st.booleans())
def test_generated_valid_addresses_roundtrip(atoms, labels, upper, brackets):
    local = ".".join(atoms)
    domain = ".".join(labels)
    shown = domain.upper() if upper else domain
    path = f"<{local}@{shown}>" if brackets else f"{local}@{shown}"
    cmd = parse(f"RCPT TO:{path}")
    assert isinstance(cmd, RcptTo), (path, cmd)
    assert cmd.address.local == local and cmd.address.domain == domain
    assert cmd.address.text == f"{local}@{shown}"
