"""client.py: ReplyReader (multi-line, split feeds, limits), split_status, parse_ehlo, command builders."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipd.smtp import replies
from vipd.smtp.client import (MAX_REPLY_LINE, MAX_REPLY_LINES, RemoteProtocolError, ReplyReader,
                              mail_command, parse_ehlo, rcpt_command, split_status, xclient_command)
from vipd.smtp.commands import NULL_PATH, Address, MailFrom, RcptTo, Xclient, parse_command
from vipd.smtp.replies import Reply, parse_reply_line

EHLO = b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"


def test_single_line_with_status():
    assert ReplyReader().feed(b"250 2.1.0 Sender ok\r\n") == [Reply(250, "2.1.0", "Sender ok")]


def test_single_line_without_status():
    assert ReplyReader().feed(b"220 mx.example.org ESMTP ready\r\n") == [
        Reply(220, None, "mx.example.org ESMTP ready")]


def test_multi_line():
    (reply,) = ReplyReader().feed(EHLO)
    assert reply.code == 250 and reply.status is None
    assert reply.lines() == ["mx.example.org", "PIPELINING", "SIZE 10240000", "8BITMIME", "ENHANCEDSTATUSCODES"]


def test_multi_line_status_lifted_from_every_line():
    (reply,) = ReplyReader().feed(b"550-5.7.1 Rejected\r\n550-5.7.1 see https://x/\r\n550 5.7.1 bye\r\n")
    assert reply == Reply(550, "5.7.1", "Rejected\nsee https://x/\nbye")


def test_several_replies_in_one_feed_in_order():
    data = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 No such user\r\n354 Go ahead\r\n"
    assert [(r.code, r.status) for r in ReplyReader().feed(data)] == [
        (250, "2.1.0"), (250, "2.1.5"), (550, "5.1.1"), (354, None)]


@pytest.mark.parametrize("data", [EHLO, b"250 2.0.0 Ok\r\n550-5.1.1 a\r\n550 5.1.1 b\r\n221 2.0.0 Bye\r\n"])
def test_split_across_feeds_gives_the_same_replies(data):
    whole = ReplyReader().feed(data)
    for cut in range(len(data) + 1):
        reader = ReplyReader()
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == whole
    reader = ReplyReader()
    assert [r for i in range(len(data)) for r in reader.feed(data[i:i + 1])] == whole


def test_incomplete_reply_waits():
    reader = ReplyReader()
    assert reader.feed(b"250-first\r\n250-second\r\n") == []
    assert reader.feed(b"250 last") == []
    assert reader.feed(b"\r\n") == [Reply(250, None, "first\nsecond\nlast")]


def test_bare_lf_and_bare_code_tolerated():
    assert ReplyReader().feed(b"250 Ok\n250\r\n") == [Reply(250, None, "Ok"), Reply(250, None, "")]


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 400 Bad Request\r\n",
    b"hello\r\n",
    b"25 short\r\n",
    b"2500 too long code\r\n",
    b"250_bad separator\r\n",
    b"150 one-xx is not SMTP\r\n",
    b"600 out of range\r\n",
    b"\r\n",
    b"250-first\r\n550 code changed\r\n",
])
def test_garbage_raises(data):
    with pytest.raises(RemoteProtocolError):
        ReplyReader().feed(data)


def test_too_long_line_raises_even_when_complete():
    """The limit is on the line, not on how the bytes happened to arrive."""
    line = b"250 " + b"x" * (MAX_REPLY_LINE + 10) + b"\r\n"
    with pytest.raises(RemoteProtocolError):
        ReplyReader().feed(line)
    with pytest.raises(RemoteProtocolError):
        ReplyReader().feed(line[:-2])            # no end of line yet: refused without waiting for it


def test_line_at_the_limit_is_accepted_whatever_the_chunking():
    line = b"250 " + b"x" * (MAX_REPLY_LINE - 4) + b"\r\n"     # MAX_REPLY_LINE octets before the CRLF
    (reply,) = ReplyReader().feed(line)
    assert len(reply.text) == MAX_REPLY_LINE - 4
    reader = ReplyReader()
    assert reader.feed(line[:-1]) == [] and reader.feed(line[-1:]) == [reply]


def test_too_many_lines_raises():
    reader = ReplyReader()
    with pytest.raises(RemoteProtocolError):
        reader.feed(b"250-x\r\n" * (MAX_REPLY_LINES + 1))
    ok = ReplyReader().feed(b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 x\r\n")
    assert len(ok[0].lines()) == MAX_REPLY_LINES


def test_unbounded_junk_without_newline_raises():
    reader = ReplyReader()
    with pytest.raises(RemoteProtocolError):
        for _ in range(100):
            reader.feed(b"y" * 1000)


# --- split_status ------------------------------------------------------------------------------
@pytest.mark.parametrize("code, lines, expected", [
    (250, ["2.0.0 Ok"], Reply(250, "2.0.0", "Ok")),
    (250, ["2.0.0"], Reply(250, "2.0.0", "")),
    (550, ["5.7.1 no", "5.7.1 really"], Reply(550, "5.7.1", "no\nreally")),
    (550, ["2.0.0 class mismatch"], Reply(550, None, "2.0.0 class mismatch")),   # X must match the code
    (250, ["2.0.0Ok"], Reply(250, None, "2.0.0Ok")),                           # needs a space after it
    (250, ["2.0 Ok"], Reply(250, None, "2.0 Ok")),
    (451, ["4.3.0 a", "no status here"], Reply(451, "4.3.0", "a\nno status here")),
    (250, ["2.1.0 ok", "2.1.0x keeps 2.1.0 inside"], Reply(250, "2.1.0", "ok\n2.1.0x keeps 2.1.0 inside")),
    (250, ["2.1.0 ok", "2.1.05 other"], Reply(250, "2.1.0", "ok\n2.1.05 other")),
])
def test_split_status(code, lines, expected):
    assert split_status(code, lines) == expected


def test_parse_reply_line():
    assert parse_reply_line(b"250-PIPELINING") == (250, False, "PIPELINING")
    assert parse_reply_line(b"250 Ok") == (250, True, "Ok")
    assert parse_reply_line(b"250") == (250, True, "")
    assert parse_reply_line(b"abc") is None


# --- every reply vipd sends reads back the same ------------------------------------------------
CATALOGUE = [v for v in vars(replies).values() if isinstance(v, Reply)]


@pytest.mark.parametrize("reply", CATALOGUE, ids=str)
def test_catalogue_roundtrip(reply):
    assert ReplyReader().feed(reply.to_bytes()) == [reply]
    # RFC 3463: the status class matches the basic code's first digit.
    if reply.status is not None:
        assert reply.status[0] == str(reply.code)[0]


def test_ehlo_reply_roundtrip_and_parse():
    reply = replies.ehlo_reply("mx.test", ["PIPELINING", "SIZE 1000", "8BITMIME"])
    (back,) = ReplyReader().feed(reply.to_bytes())
    assert back == reply
    assert parse_ehlo(back) == {"PIPELINING": "", "SIZE": "1000", "8BITMIME": ""}


_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=200, max_value=599), st.one_of(st.none(), st.tuples(
    st.integers(0, 999), st.integers(0, 999))), st.lists(_TEXT, min_size=1, max_size=5))
def test_reply_roundtrip(code, detail, lines):
    # RFC 3463 classes are 2, 4 and 5 only.
    status = None if detail is None or code // 100 == 3 else f"{str(code)[0]}.{detail[0]}.{detail[1]}"
    reply = Reply(code, status, "\n".join(lines))
    (back,) = ReplyReader().feed(reply.to_bytes())
    assert back.code == code
    if status is not None:
        assert back == reply


# --- command builders ---------------------------------------------------------------------------
def test_mail_command_roundtrip():
    sender = Address("a.b", "example.org", "a.b@example.org")
    wire = mail_command(sender, size=123, body="8BITMIME")
    assert wire == b"MAIL FROM:<a.b@example.org> SIZE=123 BODY=8BITMIME\r\n"
    assert parse_command(wire[:-2], max_message_bytes=1000) == MailFrom(
        sender, (("SIZE", "123"), ("BODY", "8BITMIME")), 123, "8BITMIME")
    assert mail_command(NULL_PATH) == b"MAIL FROM:<>\r\n"


def test_rcpt_command_roundtrip():
    for addr in (Address("u", "x.example", "u@x.example"), Address('"a b"', "x.example", '"a b"@x.example'),
                 Address("postmaster", "", "postmaster")):
        wire = rcpt_command(addr)
        parsed = parse_command(wire[:-2], max_message_bytes=1)
        assert isinstance(parsed, RcptTo) and parsed.address.text == addr.text


def test_xclient_command_roundtrip():
    attrs = {"NAME": "mx.example", "ADDR": "192.0.2.1", "HELO": "a b+c=d", "PROTO": "ESMTP"}
    wire = xclient_command(attrs)
    assert b" HELO=a+20b+2Bc+3Dd " in wire                      # RFC 1891 xtext
    parsed = parse_command(wire[:-2], max_message_bytes=1)
    assert isinstance(parsed, Xclient)
    assert dict(parsed.attrs) == attrs
