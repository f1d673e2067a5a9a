"""The server machine against a plain model of RFC 5321 section 4.1.4 (STYLE.md section 9).

The machine is driven as vipd's adapter drives it, with a fixed policy that accepts whatever it is
asked about and answers everything else with ``standard_reply``. The model predicts the reply code of
every command from a plain reading of the RFC (sequence rules, limits, the error budget), and predicts
the verdict on each message body from the raw bytes with its own simple code. Invariants: the machine
never raises, every command gets exactly one reply, what goes on the wire parses back as SMTP replies,
and nothing at all is said after a 221 or 421.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from unit.smtp._harness import accept_all
from vipd.smtp import replies
from vipd.smtp.client import ReplyReader
from vipd.smtp.lines import BodyChunk, unstuff
from vipd.smtp.replies import Reply
from vipd.smtp.server import Limits, MessageComplete, ServerConnection, Sentinel, State

LIMITS = Limits(max_command_line_bytes=512, max_text_line_bytes=200, max_message_bytes=2000,
                max_recipients=3, max_errors=12)


# --- the system under test, driven like the adapter does ---------------------------------------
# The same accept-everything answers as the unit tests' harness.
policy = accept_all


# --- the model ----------------------------------------------------------------------------------
class Model:
    """RFC 5321 4.1.4 as a checklist: what a correct server answers to each command."""

    def __init__(self) -> None:
        self.closed = False
        self.helo = False
        self.in_mail = False
        self.rcpts = 0
        self.errors = 0

    def reset(self) -> None:
        self.in_mail = False
        self.rcpts = 0

    def error(self, code: int) -> int:
        """A protocol error: counted; the one that spends the budget is answered 421 instead."""
        self.errors += 1
        if self.errors >= LIMITS.max_errors:
            self.closed = True
            return 421
        return code

    def helo_cmd(self) -> int:
        self.helo = True
        self.reset()
        return 250

    def mail(self, size: int | None) -> int:
        # The RFC does not order parameter and sequence errors; vipd parses the line first.
        if size is not None and size > LIMITS.max_message_bytes:
            return self.error(552)          # RFC 1870: 552 5.3.4
        if self.in_mail or not self.helo:
            return self.error(503)
        self.in_mail = True
        return 250

    def rcpt(self) -> int:
        if not self.in_mail:
            return self.error(503)
        if self.rcpts >= LIMITS.max_recipients:
            return 452                      # RFC 5321 4.5.3.1.10; not a protocol error
        self.rcpts += 1
        return 250

    def data(self) -> int:
        if not self.in_mail or self.rcpts == 0:
            return self.error(503)
        return 354

    def message(self, code: int) -> int:
        self.reset()
        return code

    def rset(self) -> int:
        self.reset()
        return 250

    def quit(self) -> int:
        self.closed = True
        return 221


def judge_body(raw: bytes | None) -> tuple[int, int]:
    """(reply code, unstuffed size) for DATA content ``raw`` sent as ``raw CRLF . CRLF``."""
    if raw is None:                         # DATA then "." straight away
        return 250, 0
    seg = raw + b"\r\n"
    if LIMITS.reject_nul and b"\x00" in seg:
        return 550, -1
    crlf = seg.count(b"\r\n")
    if seg.count(b"\n") != crlf or seg.count(b"\r") != crlf:
        return 550, -1
    lines = seg.split(b"\r\n")[:-1]
    size = sum(len(line) + 2 - line.startswith(b".") for line in lines)
    if size > LIMITS.max_message_bytes:
        return 552, size
    # RFC 5321 4.5.3.1.6: 1000 octets with CRLF, not counting the dot added for transparency.
    if any(len(line) + 2 > LIMITS.max_text_line_bytes + line.startswith(b".") for line in lines):
        return 550, size
    return 250, size


# --- strategies ---------------------------------------------------------------------------------
ADDRESSES = st.sampled_from(["a@example.org", "B.c@Example.NET", '"q x"@example.com', "u@[192.0.2.1]",
                             "@r.example:u@d.example", "x@y.example."])
_PLAIN = st.binary(max_size=260).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b""))
_LINES = st.lists(st.one_of(_PLAIN, _PLAIN.map(lambda b: b"." + b), st.just(b".")), max_size=8)
_STUFFED = _LINES.map(lambda lines: b"\r\n".join(b"." + x if x.startswith(b".") else x for x in lines))
_NASTY = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"\x00", b"text", b"\r\n.", b"x" * 150]),
                  max_size=12).map(b"".join)
_HUGE = st.integers(min_value=1, max_value=40).map(lambda n: (b"y" * 60 + b"\r\n") * n)


def _one_message(raw: bytes | None) -> bool:
    """The content ends exactly at our own CRLF.CRLF (no early end marker hidden in it)."""
    if raw is None:
        return True
    wire = raw + b"\r\n.\r\n"
    return wire.find(b"\r\n.\r\n") == len(raw) and not wire.startswith(b".\r\n")


BODIES = st.one_of(st.none(), _STUFFED, _NASTY, st.binary(max_size=120), _HUGE).filter(_one_message)
GARBAGE_LINE = st.binary(max_size=700).map(lambda b: b"Z" + b.replace(b"\n", b"") + b"\r\n")


class SmtpSession(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.conn = ServerConnection(LIMITS)
        self.model = Model()
        self.reader = ReplyReader()
        self.events: list[object] = []
        out = self.conn.send(replies.greeting("mx.test ESMTP"))
        assert self.reader.feed(out) == [Reply(220, None, "mx.test ESMTP")]

    # --- driving --------------------------------------------------------------------------------
    def feed(self, data: bytes) -> list[Reply]:
        """Feed bytes, answer every event; return the replies as the client reads them off the wire."""
        self.conn.receive_data(data)
        sent: list[Reply] = []
        wire = bytearray()
        while not isinstance(event := self.conn.next_event(), Sentinel):
            self.events.append(event)
            reply = policy(self.conn, event)
            if reply is not None:
                wire += self.conn.send(reply)
                sent.append(reply)
        parsed = self.reader.feed(bytes(wire))
        assert parsed == sent                    # the wire is valid SMTP and says what was decided
        assert self.conn.pending is None
        return parsed

    def check(self, line: bytes, expect: int | list[int]) -> list[Reply]:
        """Send command line(s); each command gets exactly the predicted reply, nothing after closing."""
        expected = expect if isinstance(expect, list) else [expect]
        got = self.feed(line)
        assert [r.code for r in got] == expected, (line[:80], got)
        return got

    def expect(self, predict) -> int | list[int]:
        return [] if self.model.closed else predict()

    # --- rules ----------------------------------------------------------------------------------
    @rule()
    def ehlo(self):
        self.check(b"EHLO client.example\r\n", self.expect(self.model.helo_cmd))

    @rule()
    def helo(self):
        self.check(b"HELO client.example\r\n", self.expect(self.model.helo_cmd))

    @rule(addr=ADDRESSES, size=st.one_of(st.none(), st.integers(min_value=0, max_value=4000)))
    def mail(self, addr, size):
        param = b"" if size is None else b" SIZE=%d" % size
        got = self.check(b"MAIL FROM:<" + addr.encode() + b">" + param + b"\r\n",
                         self.expect(lambda: self.model.mail(size)))
        if got and got[0].code == 552:
            assert got[0].status == "5.3.4"

    @rule()
    def mail_null(self):
        self.check(b"MAIL FROM:<>\r\n", self.expect(lambda: self.model.mail(None)))

    @rule(addr=st.one_of(ADDRESSES, st.just("postmaster")))
    def rcpt(self, addr):
        got = self.check(b"RCPT TO:<" + addr.encode() + b">\r\n", self.expect(self.model.rcpt))
        if got and got[0].code == 452:
            assert got[0].status == "4.5.3"

    @rule(n=st.integers(min_value=1, max_value=6))
    def pipelined_envelope(self, n):
        """MAIL and n RCPTs in one write (RFC 2920): one reply each, in order."""
        group = b"MAIL FROM:<a@example.org>\r\n" + b"RCPT TO:<r@example.net>\r\n" * n
        expected: list[int] = []
        if not self.model.closed:
            expected.append(self.model.mail(None))
            for _ in range(n):
                if self.model.closed:
                    break
                expected.append(self.model.rcpt())
        self.check(group, expected)

    @rule(raw=BODIES)
    def data(self, raw):
        got = self.check(b"DATA\r\n", self.expect(self.model.data))
        if not got or got[0].code != 354:
            return
        code, size = judge_body(raw)
        wire = b".\r\n" if raw is None else raw + b"\r\n.\r\n"
        mark = len(self.events)
        self.check(wire, self.model.message(code))
        new = self.events[mark:]
        (done,) = [e for e in new if isinstance(e, MessageComplete)]
        assert (done.error is None) == (code == 250)
        if size >= 0:
            assert done.size == size
        if code == 250:
            body = b"".join(e.data for e in new if isinstance(e, BodyChunk))
            assert unstuff(body) == (b"" if raw is None else unstuff(raw + b"\r\n"))

    @rule(raw=BODIES, rcpts=st.integers(min_value=1, max_value=4))
    def transaction(self, raw, rcpts):
        """A whole transaction, one command at a time (what most clients do)."""
        self.mail("a@example.org", None)
        for _ in range(rcpts):
            self.rcpt("b@example.net")
        self.data(raw)

    @rule()
    def rset(self):
        self.check(b"RSET\r\n", self.expect(self.model.rset))

    @rule()
    def noop(self):
        self.check(b"NOOP hello\r\n", self.expect(lambda: 250))

    @rule()
    def vrfy(self):
        self.check(b"VRFY someone\r\n", self.expect(lambda: 252))

    @precondition(lambda self: len(self.events) > 25)        # let most sessions run a while first
    @rule()
    def quit(self):
        self.check(b"QUIT\r\n", self.expect(self.model.quit))

    @rule(line=GARBAGE_LINE)
    def garbage_line(self, line):
        """An unknown verb, maybe with control or 8-bit bytes, maybe too long: one 500 each."""
        got = self.check(line, self.expect(lambda: self.model.error(500)))
        if got and got[0].code == 500 and len(line) > LIMITS.max_command_line_bytes:
            assert got[0] == replies.LINE_TOO_LONG

    @rule(length=st.integers(min_value=LIMITS.max_command_line_bytes - 3,
                             max_value=LIMITS.max_command_line_bytes + 3))
    def long_line(self, length):
        """NOOP lines around the limit (which counts the CRLF); an over-long one is refused, once."""
        line = b"NOOP " + b"n" * (length - 7) + b"\r\n"
        assert len(line) == length
        ok = length <= LIMITS.max_command_line_bytes
        self.check(line, self.expect(lambda: 250 if ok else self.model.error(500)))

    @rule()
    def bare_lf(self):
        self.check(b"NOOP\n", self.expect(lambda: self.model.error(500)))

    @rule(data=st.binary(max_size=600))
    def garbage(self, data):
        """Arbitrary bytes: the machine may only reply, never raise. The model then follows the machine."""
        self.feed(data + b"\r\n")
        if self.conn.state is State.DATA:
            self.feed(b"\r\n.\r\n")
        model = self.model
        model.closed = self.conn.closed
        model.helo = self.conn.helo is not None
        model.in_mail = self.conn.state in (State.MAIL, State.RCPT)
        model.rcpts = self.conn.rcpt_count
        model.errors = self.conn.errors

    # --- invariants ------------------------------------------------------------------------------
    @invariant()
    def machine_agrees_with_model(self):
        assert self.conn.closed == self.model.closed
        if not self.model.closed:
            assert (self.conn.helo is not None) == self.model.helo
            assert (self.conn.state in (State.MAIL, State.RCPT)) == self.model.in_mail
            assert self.conn.rcpt_count == self.model.rcpts
            assert self.conn.state is not State.DATA
            assert self.conn.errors < LIMITS.max_errors

    @invariant()
    def silent_once_closed(self):
        if self.conn.closed:
            assert self.feed(b"NOOP\r\nQUIT\r\n") == []


TestSmtpSession = SmtpSession.TestCase
TestSmtpSession.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow,
                                                           HealthCheck.filter_too_much])
