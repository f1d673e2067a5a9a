"""ServerConnection: the whole dialogue, pipelining, sequence rules, limits and DATA, driven with bytes."""

from __future__ import annotations

import pytest

from vipd.smtp import replies
from vipd.smtp.client import ReplyReader, mail_command, parse_ehlo, rcpt_command
from vipd.smtp.commands import (Address, Data, Ehlo, Expn, Helo, Help, MailFrom, Noop, Quit, RcptTo, Rset,
                                Unknown, Vrfy, Xclient)
from vipd.smtp.lines import BodyChunk, unstuff
from vipd.smtp.replies import Reply
from vipd.smtp.server import (NEED_DATA, PAUSED, ConnectionClosed, Greeting, Limits,
                              LocalProtocolError, MessageComplete, ProtocolViolation,
                              ServerConnection, State, standard_reply)

from ._harness import BANNER, HOST, Driver, stuff

ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


def codes(pairs) -> list[int]:
    return [r.code for _, r in pairs if r is not None]


def only(events, cls):
    return [e for e in events if isinstance(e, cls)]


def body_of(driver: Driver, since: int = 0) -> bytes:
    return b"".join(e.data for e in driver.events(since) if isinstance(e, BodyChunk))


# --- greeting and the whole dialogue ----------------------------------------------------------
def test_greeting_is_pending_from_the_start_and_must_be_answered():
    conn = ServerConnection(Limits())
    assert conn.state is State.CONNECT
    assert isinstance(conn.pending, Greeting)
    assert conn.next_event() is PAUSED
    conn.receive_data(b"EHLO early.example\r\n")      # a client talking first must wait
    assert conn.next_event() is PAUSED
    assert conn.send(replies.greeting("mx ESMTP")) == b"220 mx ESMTP\r\n"
    assert conn.state is State.READY
    assert conn.next_event() == Ehlo("early.example")


def test_send_without_pending_event_is_a_local_error():
    conn = ServerConnection(Limits())
    conn.send(replies.greeting("x"))
    with pytest.raises(LocalProtocolError):
        conn.send(replies.OK)
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize("reply", [Reply(554, "5.7.1", "Go away"), replies.TOO_MANY_SESSIONS])
def test_greeting_refused_closes(reply):
    conn = ServerConnection(Limits())
    assert conn.send(reply) == reply.to_bytes()
    assert conn.closed
    conn.receive_data(b"EHLO x\r\n")
    assert conn.next_event() is NEED_DATA


def test_full_dialogue():
    d = Driver()
    assert d.replies == [Reply(220, None, BANNER)]
    d.feed(b"EHLO client.example\r\n")
    ehlo = d.replies[-1]
    assert ehlo.code == 250 and ehlo.lines()[0] == HOST
    keywords = parse_ehlo(ehlo)
    assert "PIPELINING" in keywords and keywords["SIZE"] == str(Limits().max_message_bytes)
    assert "8BITMIME" in keywords and "ENHANCEDSTATUSCODES" in keywords and "XCLIENT" not in keywords
    assert d.conn.helo == "client.example" and d.conn.esmtp

    d.feed(b"MAIL FROM:<a@example.org> SIZE=20\r\n")
    assert d.conn.state is State.MAIL
    d.feed(b"RCPT TO:<b@example.net>\r\n")
    assert d.conn.state is State.RCPT and d.conn.rcpt_count == 1
    d.feed(b"DATA\r\n")
    assert d.conn.state is State.DATA
    mark = len(d.trace)
    d.feed(b"Subject: x\r\n\r\nhello\r\n.\r\n")
    assert body_of(d, mark) == b"Subject: x\r\n\r\nhello\r\n"
    done = only(d.events(mark), MessageComplete)
    assert done == [MessageComplete(size=21, error=None)]
    assert d.conn.state is State.READY and d.conn.rcpt_count == 0 and d.conn.helo == "client.example"
    d.feed(b"QUIT\r\n")
    assert [r.code for r in d.replies] == [220, 250, 250, 250, 354, 250, 221]
    assert d.replies[-1] == replies.BYE
    assert d.conn.closed
    assert d.feed(b"NOOP\r\n") == []                # nothing is read after QUIT
    assert d.conn.next_event() is NEED_DATA


def test_helo_is_not_esmtp():
    d = Driver()
    d.feed(b"HELO old.example\r\n")
    assert d.replies[-1] == Reply(250, None, HOST)
    assert d.conn.helo == "old.example" and not d.conn.esmtp


def test_replies_on_the_wire_are_parseable_and_match():
    d = Driver()
    d.feed(ENVELOPE + b"x\r\n.\r\nVRFY x\r\nHELP\r\nBOGUS\r\nRSET\r\nQUIT\r\n")
    reader = ReplyReader()
    parsed = reader.feed(bytes(d.wire))
    assert parsed == [r for _, r in d.answered()]
    assert [r.code for r in parsed] == [220, 250, 250, 250, 354, 250, 252, 214, 500, 250, 221]


def test_client_builders_against_server():
    """client.py and server.py agree (h11's ConnectionPair idea)."""
    d = Driver()
    sender = Address("a", "example.org", "a@example.org")
    rcpt = Address('"x y"', "example.net", '"x y"@example.net')
    d.feed(b"EHLO c.example\r\n" + mail_command(sender, size=10, body="8BITMIME") + rcpt_command(rcpt))
    mail, rcpt_event = only(d.events(), MailFrom)[0], only(d.events(), RcptTo)[0]
    assert mail.address == sender and mail.size == 10 and mail.body == "8BITMIME"
    assert rcpt_event.address == rcpt


# --- pipelining (RFC 2920) ---------------------------------------------------------------------
def test_pipelined_group_events_in_order_one_reply_each():
    conn = ServerConnection(Limits())
    conn.send(replies.greeting("x"))
    conn.receive_data(b"EHLO c\r\n")
    conn.next_event()
    conn.send(replies.ehlo_reply("x", []))
    conn.receive_data(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@f.example>\r\n"
                      b"DATA\r\nbody\r\n.\r\nQUIT\r\n")
    expected = [(MailFrom, replies.SENDER_OK), (RcptTo, replies.RCPT_OK), (RcptTo, replies.RCPT_OK),
                (Data, replies.START_DATA)]
    for cls, reply in expected:
        event = conn.next_event()
        assert isinstance(event, cls)
        assert conn.pending is event
        assert conn.next_event() is PAUSED            # nothing further before this one is answered
        assert conn.next_event() is PAUSED
        assert conn.send(reply) == reply.to_bytes()
    assert conn.next_event() == BodyChunk(b"body\r\n")
    assert conn.pending is None                       # body chunks take no answer
    done = conn.next_event()
    assert done == MessageComplete(6, None)
    assert conn.next_event() is PAUSED
    conn.send(replies.OK)
    assert isinstance(conn.next_event(), Quit)
    conn.send(replies.BYE)
    assert conn.next_event() is NEED_DATA


def test_pipelined_rcpt_rejections_are_answered_in_order():
    def policy(conn, event):
        if isinstance(event, RcptTo) and event.address.local == "bad":
            return Reply(550, "5.1.1", "No such user")
        from ._harness import accept_all
        return accept_all(conn, event)

    d = Driver(policy=policy)
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bad@x.example>\r\nRCPT TO:<good@x.example>\r\n"
           b"RCPT TO:<bad@x.example>\r\nDATA\r\nhi\r\n.\r\n")
    assert [r.code for r in d.replies] == [220, 250, 250, 550, 250, 550, 354, 250]
    assert d.conn.rcpt_count == 0 and d.conn.state is State.READY


def test_data_refused_by_policy_keeps_the_transaction():
    def policy(conn, event):
        from ._harness import accept_all
        return Reply(451, "4.3.0", "later") if isinstance(event, Data) else accept_all(conn, event)

    d = Driver(policy=policy)
    d.feed(ENVELOPE)
    assert d.replies[-1].code == 451 and d.conn.state is State.RCPT


@pytest.mark.parametrize("cls", [MailFrom, RcptTo, Noop, MessageComplete])
def test_any_421_answer_closes(cls):
    """A 421 from the adapter (shutting down, backend trouble) ends the session, whatever it answered."""
    def policy(conn, event):
        from ._harness import accept_all
        return replies.SHUTTING_DOWN if isinstance(event, cls) else accept_all(conn, event)

    d = Driver(policy=policy)
    pairs = d.feed(ENVELOPE.replace(b"DATA\r\n", b"NOOP\r\nDATA\r\nx\r\n.\r\n") + b"NOOP\r\nRSET\r\n")
    assert pairs[-1][1] == replies.SHUTTING_DOWN and isinstance(pairs[-1][0], cls)
    assert d.conn.closed and d.conn.next_event() is NEED_DATA


def test_data_answered_250_is_a_local_error():
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    d.conn.receive_data(b"DATA\r\n")
    assert isinstance(d.conn.next_event(), Data)
    with pytest.raises(LocalProtocolError):
        d.conn.send(replies.OK)


# --- sequence errors (RFC 5321 4.1.4) -----------------------------------------------------------
def test_rcpt_before_mail():
    d = Driver()
    pairs = d.feed(b"EHLO c\r\nRCPT TO:<b@example.net>\r\n")
    event, reply = pairs[-1]
    assert isinstance(event, ProtocolViolation) and event.kind == "sequence"
    assert reply == replies.NEED_MAIL and (reply.code, reply.status) == (503, "5.5.1")


def test_data_before_mail_and_before_rcpt():
    d = Driver()
    d.feed(b"EHLO c\r\nDATA\r\n")
    assert d.replies[-1] == replies.NEED_MAIL
    d.feed(b"MAIL FROM:<a@b.example>\r\nDATA\r\n")
    assert d.replies[-1] == replies.NEED_RCPT and d.replies[-1].code == 503
    assert d.conn.state is State.MAIL                  # the transaction survives the refusal
    d.feed(b"RCPT TO:<c@d.example>\r\nDATA\r\n")
    assert d.replies[-1] == replies.START_DATA


def test_data_after_all_rcpts_refused_is_554():
    def policy(conn, event):
        from ._harness import accept_all
        return Reply(550, "5.1.1", "no") if isinstance(event, RcptTo) else accept_all(conn, event)

    d = Driver(policy=policy)
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    assert d.replies[-1] == replies.NO_VALID_RCPTS and d.replies[-1].code == 554


def test_nested_mail():
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nMAIL FROM:<x@y.example>\r\n")
    assert d.replies[-1] == replies.NESTED_MAIL and d.replies[-1].code == 503
    d.feed(b"RCPT TO:<c@d.example>\r\nMAIL FROM:<x@y.example>\r\n")
    assert d.replies[-1] == replies.NESTED_MAIL


def test_mail_before_helo():
    d = Driver()
    pairs = d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert pairs[-1][1] == replies.NEED_HELO
    assert (pairs[-1][1].code, pairs[-1][1].status) == (503, "5.5.1")
    assert d.conn.state is State.READY
    d2 = Driver(limits=Limits(need_helo=False))
    assert isinstance(d2.feed(b"MAIL FROM:<a@b.example>\r\n")[-1][0], MailFrom)


def test_commands_allowed_at_any_time():
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    pairs = d.feed(b"NOOP\r\nVRFY x\r\nEXPN y\r\nHELP\r\n")
    assert [type(e) for e, _ in pairs] == [Noop, Vrfy, Expn, Help]
    assert codes(pairs) == [250, 252, 502, 214]
    assert d.conn.state is State.RCPT                    # none of them touched the transaction


def test_rset_resets_the_transaction_not_the_helo():
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRSET\r\nDATA\r\n")
    assert d.replies[-2] == replies.RSET_OK
    assert d.replies[-1] == replies.NEED_MAIL
    assert d.conn.helo == "c"


def test_ehlo_mid_transaction_resets():
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nEHLO again\r\nRCPT TO:<x@y.z>\r\n")
    assert d.replies[-1] == replies.NEED_MAIL
    assert d.conn.helo == "again" and d.conn.state is State.READY


def test_unknown_and_unoffered_commands():
    d = Driver()
    pairs = d.feed(b"EHLO c\r\nFOO bar\r\nSTARTTLS\r\nAUTH LOGIN\r\nXCLIENT NAME=x\r\n")
    assert [r for _, r in pairs[1:]] == [replies.UNKNOWN_COMMAND, replies.NOT_IMPLEMENTED,
                                         replies.NOT_IMPLEMENTED, replies.NOT_IMPLEMENTED]
    assert [e.kind for e, _ in pairs[1:]] == ["unknown_command", "not_implemented", "not_implemented",
                                             "not_implemented"]


@pytest.mark.parametrize("line, reply", [
    (b"MAIL FROM:<a@b.example> FOO=1\r\n", replies.BAD_PARAMETER),
    (b"MAIL FROM:<a@b.example> SIZE=99999999999\r\n", replies.TOO_BIG),
    (b"EHLO\r\n", replies.HELO_SYNTAX),
    (b"RCPT TO:<>\r\n", replies.BAD_RCPT_ADDRESS),
])
def test_syntax_errors_become_violations(line, reply):
    d = Driver()
    pairs = d.feed(b"EHLO c\r\n" + line)
    event, sent = pairs[-1]
    assert isinstance(event, ProtocolViolation) and event.kind == "syntax"
    assert sent == reply
    assert d.conn.errors == 1


# --- command line framing ---------------------------------------------------------------------
def test_long_command_line_refused_once_session_goes_on():
    d = Driver()
    pairs = d.feed(b"EHLO c\r\nNOOP " + b"x" * 3000 + b"\r\nNOOP\r\n")
    assert [r for _, r in pairs] == [pairs[0][1], replies.LINE_TOO_LONG, replies.NOOP_OK]
    assert pairs[1][0].kind == "line_too_long"
    assert (replies.LINE_TOO_LONG.code, replies.LINE_TOO_LONG.status) == (500, "5.5.2")


@pytest.mark.parametrize("split", [None, 10, 2048, 2049, 3000, 3008])
def test_long_line_is_never_executed_truncated(split):
    data = b"NOOP " + b"x" * 3000 + b"QUIT\r\nRSET\r\n"
    d = Driver()
    d.feed(b"EHLO c\r\n")
    chunks = [data] if split is None else [data[:split], data[split:]]
    pairs = []
    for chunk in chunks:
        pairs += d.feed(chunk)
    assert not only([e for e, _ in pairs], Quit) and not d.conn.closed
    assert [r for _, r in pairs] == [replies.LINE_TOO_LONG, replies.RSET_OK]


@pytest.mark.parametrize("limit", [512, 2048])
@pytest.mark.parametrize("split", [None, "at-limit", "bytes"])
def test_tail_past_the_limit_is_not_a_command(limit, split):
    """A reader that cut the line at the limit would run the tail: here the tail is a QUIT."""
    data = b"NOOP " + b"x" * (limit - 5) + b"QUIT\r\nNOOP\r\n"
    assert data[limit:limit + 6] == b"QUIT\r\n"
    d = Driver(limits=Limits(max_command_line_bytes=limit))
    if split is None:
        chunks = [data]
    elif split == "at-limit":
        chunks = [data[:limit], data[limit:]]
    else:
        chunks = [data[i:i + 1] for i in range(len(data))]
    for chunk in chunks:
        d.feed(chunk)
    assert [r for _, r in d.trace[1:]] == [replies.LINE_TOO_LONG, replies.NOOP_OK]
    assert not only(d.events(), Quit) and not d.conn.closed


def test_eof_after_pipelined_quit():
    d = Driver()
    d.conn.receive_data(ENVELOPE + b"body\r\n.\r\nQUIT\r\n")
    d.conn.receive_data(b"")
    pairs = d.pump()
    assert [type(e) for e, _ in pairs][-3:] == [BodyChunk, MessageComplete, Quit]
    assert d.replies[-2:] == [replies.OK, replies.BYE] and d.conn.closed


def test_long_line_that_looks_like_commands_inside():
    d = Driver()
    d.feed(b"EHLO c\r\n")
    pairs = d.feed(b"X" * 2100 + b"\rQUIT\r\n")
    assert [r for _, r in pairs] == [replies.LINE_TOO_LONG] and not d.conn.closed


@pytest.mark.parametrize("limit", [512, 2048])
def test_command_line_limit_boundary(limit):
    """max_command_line_bytes counts the whole line including CRLF (RFC 5321 4.5.3.1.4)."""
    def line(total: int) -> bytes:
        return b"NOOP " + b"n" * (total - 7) + b"\r\n"

    assert len(line(limit)) == limit
    d = Driver(limits=Limits(max_command_line_bytes=limit))
    pairs = d.feed(line(limit) + line(limit + 1) + line(limit - 1))
    assert [r for _, r in pairs] == [replies.NOOP_OK, replies.LINE_TOO_LONG, replies.NOOP_OK]


def test_bare_lf_and_nul_in_commands():
    d = Driver()
    pairs = d.feed(b"EHLO c\r\nNOOP\nQUIT\nNO\x00OP\r\nNO\rOP\r\nNOOP\r\n")
    assert [r for _, r in pairs[1:]] == [replies.BARE_LF_COMMAND, replies.BARE_LF_COMMAND,
                                         replies.BAD_CHARACTERS, replies.BAD_CHARACTERS, replies.NOOP_OK]
    assert all(r.code == 500 and r.status == "5.5.2" for _, r in pairs[1:5])
    assert not d.conn.closed and not only(d.events(), Quit)


def test_non_ascii_command():
    d = Driver()
    pairs = d.feed("EHLO \u00e9t\u00e9\r\n".encode())
    assert pairs[-1][1] == replies.NON_ASCII_COMMAND


# --- limits on errors and recipients ----------------------------------------------------------
def test_too_many_recipients():
    d = Driver(limits=Limits(max_recipients=3))
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    pairs = d.feed(b"".join(b"RCPT TO:<r%d@x.example>\r\n" % i for i in range(5)))
    assert codes(pairs) == [250, 250, 250, 452, 452]
    assert pairs[3][1] == replies.TOO_MANY_RCPTS and pairs[3][1].status == "4.5.3"
    assert pairs[3][0].kind == "too_many_recipients"
    assert d.conn.rcpt_count == 3
    d.feed(b"DATA\r\nx\r\n.\r\n")
    assert d.replies[-1] == replies.OK
    # A new transaction gets a fresh allowance.
    pairs = d.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<r@x.example>\r\n")
    assert codes(pairs) == [250, 250]


def test_recipients_over_the_limit_do_not_end_the_session():
    """RFC 5321 4.5.3.1.10: the client sends the message to the accepted ones and retries the rest.

    A big mailing pipelined past max_recipients must not be cut off by the error budget.
    """
    d = Driver(limits=Limits(max_recipients=100, max_errors=20))
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    pairs = d.feed(b"".join(b"RCPT TO:<r%d@x.example>\r\n" % i for i in range(150)) + b"DATA\r\nx\r\n.\r\n")
    assert codes(pairs).count(250) == 101 and codes(pairs).count(452) == 50
    assert not d.conn.closed and d.replies[-1] == replies.OK


def test_twenty_errors_close_the_session():
    d = Driver()
    pairs = d.feed(b"EHLO c\r\n" + b"BOGUS\r\n" * 19 + b"NOOP\r\n" + b"RCPT TO:<x@y.z>\r\n" + b"NOOP\r\n")
    sent = [r for _, r in pairs[1:]]
    assert sent[:19] == [replies.UNKNOWN_COMMAND] * 19
    assert sent[19] == replies.NOOP_OK                    # a good command between errors
    assert sent[20] == replies.TOO_MANY_ERRORS and (sent[20].code, sent[20].status) == (421, "4.7.0")
    assert len(sent) == 21                                # nothing after the 421
    assert d.conn.closed and d.conn.next_event() is NEED_DATA
    assert d.replies[-1].code == 421


def test_error_limit_counts_every_kind():
    d = Driver(limits=Limits(max_errors=4))
    pairs = d.feed(b"BOGUS\r\nNOOP\nMAIL FROM:<a@b.example>\r\n" + b"x" * 3000 + b"\r\nNOOP\r\n")
    assert [r for _, r in pairs] == [replies.UNKNOWN_COMMAND, replies.BARE_LF_COMMAND, replies.NEED_HELO,
                                     replies.TOO_MANY_ERRORS]
    # The event still says what the client did (for vipd_protocol_errors_total{kind}).
    assert [e.kind for e, _ in pairs] == ["unknown_command", "bare_lf", "sequence", "line_too_long"]
    assert d.conn.closed


# --- DATA ---------------------------------------------------------------------------------------
def test_empty_body():
    d = Driver()
    d.feed(ENVELOPE)
    mark = len(d.trace)
    d.feed(b".\r\n")
    assert d.events(mark) == [MessageComplete(0, None)]
    assert d.replies[-1] == replies.OK and d.conn.state is State.READY


def test_empty_body_in_the_same_chunk_as_data():
    d = Driver()
    pairs = d.feed(ENVELOPE + b".\r\nNOOP\r\n")
    assert [type(e) for e, _ in pairs[-3:]] == [Data, MessageComplete, Noop]


def test_dot_stuffing_counted_unstuffed():
    original = b"..\r\n.x\r\nplain\r\n"
    d = Driver()
    d.feed(ENVELOPE)
    mark = len(d.trace)
    d.feed(stuff(original))
    (done,) = only(d.events(mark), MessageComplete)
    assert done.error is None and done.size == len(original)
    assert unstuff(body_of(d, mark)) == original


@pytest.mark.parametrize("bad, error", [
    (b"bare LF\n", replies.BARE_LINE_ENDING),
    (b"bare CR\r", replies.BARE_LINE_ENDING),
    (b"a NUL \x00 byte", replies.NUL_IN_DATA),
])
@pytest.mark.parametrize("chunked", [False, True])
def test_bad_body_bytes(bad, error, chunked):
    body = b"line one\r\n" + bad + b" tail\r\nline three\r\n.\r\nNOOP\r\n"
    d = Driver()
    d.feed(ENVELOPE)
    mark = len(d.trace)
    if chunked:
        for i in range(len(body)):
            d.feed(body[i:i + 1])
    else:
        d.feed(body)
    events = d.events(mark)
    (done,) = only(events, MessageComplete)
    assert done.error == error
    assert d.trace[-2][1] == error                        # the client gets the error for the message
    for chunk in only(events, BodyChunk):
        assert b"\x00" not in chunk.data
        assert chunk.data.count(b"\r") == chunk.data.count(b"\n") == chunk.data.count(b"\r\n")
    assert isinstance(events[-1], Noop) and d.conn.state is State.READY


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r\n\x00.\r\n"]
INNER = b"MAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\nsmuggled\r\n.\r\n"


@pytest.mark.parametrize("marker", SMUGGLING, ids=repr)
@pytest.mark.parametrize("chunking", ["whole", "bytes", "marker-split"])
def test_smuggling(marker, chunking):
    d = Driver()
    d.feed(ENVELOPE)
    mark = len(d.trace)
    payload = b"Subject: hi\r\n\r\nhello" + marker + INNER + b"\r\n.\r\n" + b"NOOP\r\n"
    if chunking == "whole":
        chunks = [payload]
    elif chunking == "bytes":
        chunks = [payload[i:i + 1] for i in range(len(payload))]
    else:
        cut = payload.index(marker) + 1
        chunks = [payload[:cut], payload[cut:]]
    for chunk in chunks:
        d.feed(chunk)
    events = d.events(mark)
    completes = only(events, MessageComplete)
    assert len(completes) == 1
    assert completes[0].error is not None
    first = events.index(completes[0])
    assert not only(events[:first], MailFrom)
    assert not only(events, MailFrom) and not only(events, RcptTo)   # nothing smuggled ever runs
    for chunk in only(events, BodyChunk):
        assert b"smuggled" not in chunk.data and b"MAIL FROM" not in chunk.data
    assert not d.conn.closed and d.conn.state is State.READY


def test_message_over_max_bytes_read_to_the_dot():
    d = Driver(limits=Limits(max_message_bytes=100))
    d.feed(ENVELOPE)
    mark = len(d.trace)
    d.feed(b"x" * 98 + b"\r\n")
    assert not only(d.events(mark), MessageComplete)     # no reply before the dot (RFC 5321 4.2.5)
    d.feed(b"y\r\n" * 1000)
    assert d.conn.state is State.DATA and d.wire.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    d.feed(b".\r\nNOOP\r\n")
    (done,) = only(d.events(mark), MessageComplete)
    assert done.error == replies.TOO_BIG and (done.error.code, done.error.status) == (552, "5.3.4")
    assert d.replies[-2] == replies.TOO_BIG and d.replies[-1] == replies.NOOP_OK


def test_message_exactly_max_bytes():
    d = Driver(limits=Limits(max_message_bytes=100))
    d.feed(ENVELOPE)
    mark = len(d.trace)
    d.feed(b".." + b"x" * 97 + b"\r\n" + b".\r\n")     # 100 octets unstuffed (101 stuffed)
    (done,) = only(d.events(mark), MessageComplete)
    assert done == MessageComplete(100, None)


@pytest.mark.parametrize("length, ok", [(998, True), (999, False)])
def test_text_line_limit(length, ok):
    d = Driver()
    d.feed(ENVELOPE)
    mark = len(d.trace)
    d.feed(b"a" * length + b"\r\n.\r\n")
    (done,) = only(d.events(mark), MessageComplete)
    assert done.error == (None if ok else replies.DATA_LINE_TOO_LONG)


def test_text_line_limit_disabled():
    d = Driver(limits=Limits(max_text_line_bytes=0))
    d.feed(ENVELOPE)
    mark = len(d.trace)
    d.feed(b"a" * 5000 + b"\r\n.\r\n")
    assert only(d.events(mark), MessageComplete) == [MessageComplete(5002, None)]


def test_nul_allowed_when_not_rejected():
    d = Driver(limits=Limits(reject_nul=False))
    d.feed(ENVELOPE)
    mark = len(d.trace)
    d.feed(b"a\x00b\r\n.\r\n")
    assert only(d.events(mark), MessageComplete) == [MessageComplete(5, None)]
    assert body_of(d, mark) == b"a\x00b\r\n"


def test_second_transaction_after_message():
    d = Driver()
    d.feed(ENVELOPE + b"one\r\n.\r\n" + ENVELOPE[len(b"EHLO client.example\r\n"):] + b"two\r\n.\r\n")
    assert [e for e in d.events() if isinstance(e, MessageComplete)] == [MessageComplete(5, None)] * 2
    assert [r.code for r in d.replies] == [220, 250, 250, 250, 354, 250, 250, 250, 354, 250]


# --- EOF ----------------------------------------------------------------------------------------
def test_eof_mid_data():
    d = Driver()
    d.feed(ENVELOPE + b"partial body\r\n.\r")
    pairs = d.eof()
    assert [e for e, _ in pairs] == [ConnectionClosed(in_data=True)]
    assert d.conn.closed
    assert d.eof() == [] and d.conn.next_event() is NEED_DATA


def test_eof_between_commands():
    d = Driver()
    d.feed(b"EHLO c\r\nNOOP")            # an unfinished line is dropped
    assert [e for e, _ in d.eof()] == [ConnectionClosed(in_data=False)]


def test_eof_while_a_reply_is_pending():
    conn = ServerConnection(Limits())
    conn.send(replies.greeting("x"))
    conn.receive_data(b"NOOP\r\n")
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), Noop)
    assert conn.next_event() is PAUSED
    conn.send(replies.NOOP_OK)
    assert conn.next_event() == ConnectionClosed(in_data=False)


def test_close_out_of_turn():
    conn = ServerConnection(Limits())
    conn.send(replies.greeting("x"))
    conn.receive_data(b"NOOP\r\nNOOP\r\n")
    conn.next_event()
    assert conn.close(replies.COMMAND_TIMEOUT) == replies.COMMAND_TIMEOUT.to_bytes()
    assert conn.closed and conn.pending is None
    assert conn.next_event() is NEED_DATA


# --- XCLIENT ------------------------------------------------------------------------------------
def test_xclient_refused_unless_enabled():
    d = Driver()
    pairs = d.feed(b"EHLO c\r\nXCLIENT ADDR=192.0.2.1\r\n")
    assert pairs[-1][1] == replies.NOT_IMPLEMENTED


def test_xclient_when_enabled_resets_helo():
    d = Driver(limits=Limits(xclient=True))
    d.feed(b"EHLO proxy.example\r\n")
    assert "XCLIENT" in parse_ehlo(d.replies[-1])
    pairs = d.feed(b"XCLIENT NAME=real.example ADDR=192.0.2.1\r\n")
    event, reply = pairs[-1]
    assert isinstance(event, Xclient) and event.get("ADDR") == "192.0.2.1"
    assert reply.code == 220
    assert d.conn.helo is None and not d.conn.esmtp
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert d.replies[-1] == replies.NEED_HELO
    d.feed(b"EHLO real.example\r\nMAIL FROM:<a@b.example>\r\n")
    assert d.replies[-1] == replies.SENDER_OK


def test_xclient_refused_by_proxy_policy_keeps_helo():
    def policy(conn, event):
        from ._harness import accept_all
        return Reply(550, "5.7.0", "no") if isinstance(event, Xclient) else accept_all(conn, event)

    d = Driver(limits=Limits(xclient=True), policy=policy)
    d.feed(b"EHLO proxy.example\r\nXCLIENT ADDR=192.0.2.1\r\n")
    assert d.conn.helo == "proxy.example"


def test_xclient_only_outside_a_transaction():
    d = Driver(limits=Limits(xclient=True))
    d.feed(b"EHLO p\r\nMAIL FROM:<a@b.example>\r\nXCLIENT ADDR=192.0.2.1\r\n")
    assert d.replies[-1] == replies.BAD_SEQUENCE


# --- standard_reply -----------------------------------------------------------------------------
def test_standard_reply():
    assert standard_reply(Noop()) == replies.NOOP_OK
    assert standard_reply(Rset()) == replies.RSET_OK
    assert standard_reply(Quit()) == replies.BYE
    assert standard_reply(Help("x")) == replies.HELP
    assert standard_reply(Vrfy("x")) == replies.CANNOT_VRFY
    assert standard_reply(Vrfy("x"), privacy=frozenset({"novrfy"})) == replies.VRFY_DENIED
    violation = ProtocolViolation(replies.SYNTAX, "syntax")
    assert standard_reply(violation) is replies.SYNTAX
    for event in (Helo("x"), Ehlo("x"), MailFrom(Address("a", "b", "a@b")), RcptTo(Address("a", "b", "a@b")),
                  Data(), MessageComplete(0, None), Greeting(), Unknown("X")):
        assert standard_reply(event) is None


# --- STARTTLS (RFC 3207) ------------------------------------------------------------------------
def tls_driver() -> Driver:
    return Driver(Limits(starttls=True))


def test_starttls_is_offered_until_tls_is_on():
    d = tls_driver()
    d.feed(b"EHLO client.example\r\n")
    assert "STARTTLS" in d.replies[-1].text
    assert "STARTTLS" not in Driver().feed(b"EHLO c.example\r\n")[-1][1].text  # type: ignore[union-attr]
    d.feed(b"STARTTLS\r\n")
    assert d.replies[-1] == replies.READY_FOR_TLS
    assert d.conn.tls and d.conn.helo is None and d.conn.state is State.READY
    d.feed(b"EHLO client.example\r\n")
    assert "STARTTLS" not in d.replies[-1].text
    d.feed(b"STARTTLS\r\n")
    assert d.replies[-1] == replies.TLS_ALREADY_ACTIVE


def test_plaintext_pipelined_after_starttls_is_dropped_never_executed():
    # CVE-2011-0411: commands sent with STARTTLS in one write must not run inside the TLS session.
    d = tls_driver()
    d.feed(b"EHLO client.example\r\n")
    got = d.feed(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<evil@example.org>\r\n")
    assert [type(e).__name__ for e, _ in got] == ["StartTls"]
    assert d.conn.discarded_after_starttls == len(b"NOOP\r\nMAIL FROM:<evil@example.org>\r\n")
    assert d.conn.buffered == 0
    # What arrives after the handshake is a fresh session: EHLO first again.
    d.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert d.replies[-1] == replies.NEED_HELO


def test_starttls_not_offered_or_mid_transaction():
    assert Driver().feed(b"STARTTLS\r\n")[-1][1] == replies.NOT_IMPLEMENTED
    d = tls_driver()
    d.feed(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\n")
    assert d.feed(b"STARTTLS\r\n")[-1][1] == replies.BAD_SEQUENCE
    assert not d.conn.tls


def test_a_refused_starttls_changes_nothing():
    def refuse(conn, event):
        from vipd.smtp.commands import StartTls
        if isinstance(event, StartTls):
            return replies.TLS_NOT_AVAILABLE
        from ._harness import accept_all
        return accept_all(conn, event)
    d = Driver(Limits(starttls=True), policy=refuse)
    d.feed(b"EHLO c.example\r\nSTARTTLS\r\nNOOP\r\n")
    assert [r.code for r in d.replies[-2:]] == [454, 250]
    assert not d.conn.tls and d.conn.helo == "c.example"


# --- CHUNKING / BDAT (RFC 3030) -------------------------------------------------------------------
def bdat_policy(conn, event):
    from vipd.smtp.server import ChunkComplete
    from ._harness import accept_all
    if isinstance(event, ChunkComplete):
        if event.error is not None:
            return event.error
        return replies.OK if event.last else Reply(250, "2.0.0", f"{event.size} octets received")
    return accept_all(conn, event)


def chunk_driver() -> Driver:
    d = Driver(Limits(chunking=True), policy=bdat_policy)
    d.feed(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    return d


def test_bdat_chunks_become_data_wire_form():
    from vipd.smtp.server import ChunkComplete
    d = chunk_driver()
    assert "CHUNKING" in d.replies[1].text
    body = b"Subject: x\r\n\r\n.dot line\r\nplain"
    first, second = body[:20], body[20:]
    d.feed(b"BDAT %d\r\n" % len(first) + first)
    assert d.replies[-1].code == 250 and d.conn.state is State.BDAT
    d.feed(b"BDAT %d LAST\r\n" % len(second) + second)
    assert d.replies[-1] == replies.OK and d.conn.state is State.READY
    wire = body_of(d)
    assert wire == b"Subject: x\r\n\r\n..dot line\r\nplain\r\n"      # stuffed, and ends in CRLF
    assert unstuff(wire) == body + b"\r\n"
    done = only(d.events(), ChunkComplete)
    assert [(c.size, c.last) for c in done] == [(20, False), (len(second), True)]


def test_bdat_octets_are_consumed_even_when_refused():
    d = Driver(Limits(chunking=True), policy=bdat_policy)
    d.feed(b"EHLO c.example\r\n")
    # Out of sequence: the 12 octets must not be read as commands (they look like one).
    d.feed(b"BDAT 12 LAST\r\nQUIT\r\nNOOP\r\n")
    assert d.replies[-1].code == 503
    assert not d.conn.closed
    d.feed(b"NOOP\r\n")
    assert d.replies[-1] == replies.NOOP_OK


def test_bdat_with_a_bare_lf_fails_the_message_and_data_cannot_follow():
    d = chunk_driver()
    d.feed(b"BDAT 8\r\nabc\n.\r\nx")
    assert d.replies[-1] == replies.BARE_LINE_ENDING and d.conn.state is State.READY
    d = chunk_driver()
    d.feed(b"BDAT 3\r\nabc")
    d.feed(b"DATA\r\n")
    assert d.replies[-1] == replies.BDAT_AFTER_DATA


def test_bdat_split_anywhere_gives_the_same_wire_form():
    body = b"A\r\n.B\r\n..C\r\n\r\n.\r\nend\r\n"
    whole = chunk_driver()
    whole.feed(b"BDAT %d LAST\r\n" % len(body) + body)
    for cut in range(len(body) + 1):
        d = chunk_driver()
        d.feed(b"BDAT %d\r\n" % cut + body[:cut])
        d.feed(b"BDAT %d LAST\r\n" % (len(body) - cut) + body[cut:])
        assert body_of(d) == body_of(whole), cut
    assert unstuff(body_of(whole)) == body


def test_bdat_not_offered():
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    assert d.feed(b"BDAT 3 LAST\r\n")[-1][1] == replies.NOT_IMPLEMENTED
