"""Hostile clients against the server machine under a drawn answering policy, cut into arbitrary chunks.

The machine is driven as the daemon drives it (``fuzz.smtp_driver``): a policy drawn by hypothesis
accepts or refuses HELO, MAIL and RCPT by a rule over their text, answers DATA with 354 and a finished
message with 250 or 554. Clients send valid commands, garbage, lines around and far past the limit,
bare LF, NUL, 8-bit bytes, pipelined groups, and DATA bodies with dot lines and smuggling attempts,
in any chunking. The driver checks after every event: no exception, well-formed replies, no
transaction reaches the policy unless it accepted MAIL and a RCPT, nothing said after 421 or 221,
bounded buffering. At the end the whole byte stream is replayed whole and cut otherwise, and must give
the same session.
"""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fuzz.smtp_driver import Policy, Session, assert_same_session, replay
from vipd.smtp.commands import Noop
from vipd.smtp.lines import unstuff
from vipd.smtp.server import Limits, ProtocolViolation

# --- strategies --------------------------------------------------------------------------------------
LIMITS = st.builds(
    Limits,
    max_command_line_bytes=st.sampled_from([64, 512, 2048]),
    max_text_line_bytes=st.sampled_from([0, 40, 1000]),
    max_message_bytes=st.sampled_from([30, 600, 1 << 20]),
    max_recipients=st.sampled_from([1, 3, 100]),
    reject_nul=st.booleans(),
    need_helo=st.booleans(),
    max_errors=st.sampled_from([5, 50, 50]),       # a small budget ends most sessions early
    xclient=st.booleans(),
    starttls=st.booleans(),
    chunking=st.booleans(),
)
# Mostly lenient, so that transactions get through; sometimes refusing everything.
_SHARE = st.sampled_from([0, 0, 0, 1, 2, 4, 8])
POLICIES = st.builds(
    Policy,
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    greet=st.sampled_from([True] * 19 + [False]),          # a refused banner ends the session at once
    refuse_helo=st.sampled_from([0, 0, 2, 4]),
    refuse_mail=_SHARE,
    refuse_rcpt=_SHARE,
    drop_rcpt=st.sampled_from([0, 0, 0, 1]),
    refuse_data=st.sampled_from([False, False, False, True]),
    refuse_message=_SHARE,
    refuse_tls=st.sampled_from([False, False, True]),
    probe_misuse=st.booleans(),
)

DOMAINS = st.sampled_from(["client.example", "mail.example.org", "[192.0.2.7]", "localhost", "x", "a-b.example."])
ADDRESSES = st.sampled_from(["a@example.org", "b@example.org", "c@example.net", "B.c@Example.NET",
                             '"q x"@example.com', "u@[192.0.2.1]", "@r.example:u@d.example", "postmaster",
                             "d@e", "x@y.example."])
MAIL_PARAMS = st.sampled_from(["", " SIZE=100", " SIZE=99999999", " BODY=8BITMIME", " BODY=7BIT",
                               " BODY=BINARYMIME", " FOO=bar", " SIZE=", " SIZE=1x", " SMTPUTF8"])
VERBS = st.sampled_from([
    b"DATA", b"RSET", b"NOOP", b"NOOP hi there", b"HELP", b"HELP MAIL", b"VRFY u", b"EXPN list",
    b"STARTTLS", b"AUTH PLAIN AGEAYg==", b"BDAT 10 LAST", b"XCLIENT NAME=a.example ADDR=192.0.2.1",
    b"XCLIENT", b"DATA x", b"RSET now", b"mail from:<a@b.example>", b"Rcpt To: <c@d.example>", b"",
    b" ", b"EHLO", b"HELO a b", b"MAIL FROM:a@b.example", b"MAIL FROM:<a@b.example", b"MAIL FROM:",
    b"RCPT TO:<>", b"RCPT TO:<@route.example:u@d.example>", b"ETRN x", b"TURN",
])
COMMAND = st.one_of(
    DOMAINS.map(lambda d: f"EHLO {d}".encode()),
    DOMAINS.map(lambda d: f"HELO {d}".encode()),
    st.tuples(ADDRESSES, MAIL_PARAMS).map(lambda t: f"MAIL FROM:<{t[0]}>{t[1]}".encode()),
    st.just(b"MAIL FROM:<>"),
    ADDRESSES.map(lambda a: f"RCPT TO:<{a}>".encode()),
    VERBS,
).map(lambda line: line + b"\r\n")
# Ways a line can be wrong: what ends it, what hides inside it.
_ENDINGS = st.sampled_from([b"\r\n", b"\n", b"\r\r\n", b"\n\r", b"\r", b"\r\n\r\n"])
_INSIDE = st.sampled_from([b"\x00", b"\r", b"\xff", b"\xc3\xa9", b"\x1b", b"\t", b"\x7f", b"\r\n.\r\n"])
HOSTILE_LINE = st.one_of(
    st.tuples(COMMAND, _ENDINGS).map(lambda t: t[0][:-2] + t[1]),
    st.tuples(COMMAND, _INSIDE, st.integers(min_value=0, max_value=30)).map(
        lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:]),
    st.binary(max_size=300).map(lambda b: b + b"\r\n"),
)
ANY_LINE = st.one_of(COMMAND, COMMAND, HOSTILE_LINE)

# Body pieces: honest text, dot lines, and every way of writing an end of data that is not CRLF.CRLF.
_BODY_PIECES = st.sampled_from([
    b"text", b"Subject: hi\r\n", b"\r\n", b".", b"..", b".\r\n", b"..\r\n", b"\n.\n", b"\r.\r", b"\r\n.\n",
    b"\n.\r\n", b"\r\n.\r", b"\x00", b"\xff\xfe", b"\r", b"\n", b"y" * 50, b"z" * 1100,
    b"MAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n",
    b"\r\n.\r\nMAIL FROM:<smuggled@evil.example>\r\n",
])
BODY = st.lists(_BODY_PIECES, max_size=16).map(b"".join)
_DATA_ENDS = st.sampled_from([b"\r\n.\r\n", b"\r\n.\r\n", b".\r\n", b"\n.\n", b"\r\n.\n", b"\r.\r", b""])
# Honest bodies, dot-stuffed as a client does, so that some messages get through.
_TEXT_LINES = st.lists(st.sampled_from([b"", b".", b"..", b".hidden", b"plain text", b"x" * 38, b"x" * 39]),
                       max_size=8)
CLEAN_BODY = _TEXT_LINES.map(lambda ls: b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in ls))
CUTS = st.one_of(st.none(), st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8))


class HostileClient(RuleBasedStateMachine):
    session: Session

    @initialize(limits=LIMITS, policy=POLICIES)
    def connect(self, limits, policy):
        self.session = Session(limits, policy)

    def send(self, data: bytes, cuts: list[int] | None) -> None:
        if cuts is None:
            self.session.feed(data)
        else:
            self.session.feed_in_chunks(data, cuts)

    # --- rules -----------------------------------------------------------------------------------
    @rule(line=ANY_LINE, cuts=CUTS)
    def one_line(self, line, cuts):
        self.send(line, cuts)

    @rule(lines=st.lists(ANY_LINE, min_size=2, max_size=12), cuts=CUTS)
    def pipelined(self, lines, cuts):
        """A pipelined group (RFC 2920), good and bad lines mixed, in one write or many."""
        self.send(b"".join(lines), cuts)

    @rule(delta=st.integers(min_value=-3, max_value=3), verb=st.sampled_from([b"NOOP ", b"MAIL FROM:<", b"Z"]),
          cuts=CUTS)
    def line_at_the_limit(self, delta, verb, cuts):
        """Lines around max_command_line_bytes (which counts the CRLF)."""
        limit = self.session.limits.max_command_line_bytes
        line = verb + b"a" * max(0, limit - len(verb) - 2 + delta) + b"\r\n"
        self.send_line(line, too_long=len(line) > limit, cuts=cuts)

    @rule(size=st.integers(min_value=3000, max_value=20000), ending=_ENDINGS, cuts=CUTS)
    def very_long_line(self, size, ending, cuts):
        self.send_line(b"NOOP " + b"n" * size + ending, too_long=True, cuts=cuts)

    def send_line(self, line: bytes, *, too_long: bool, cuts: list[int] | None) -> None:
        """An over-long command line is refused once, never cut and run as a shorter command."""
        s = self.session
        # Whether the machine reads our line as a command from its first octet: ask a copy of it
        # (it may be inside DATA, owed BDAT octets, or skipping the rest of an over-long line).
        probe = copy.deepcopy(s.conn)
        probe.receive_data(b"NOOP\r\n")
        fresh = isinstance(probe.next_event(), Noop)
        mark = len(s.trace)
        self.send(line, cuts)
        if not fresh or b"\n" not in line:
            return                  # not read as a command line, or not ended yet: nothing to say
        event, _ = next((e, r) for e, r in s.trace[mark:] if r is not None)
        refused = isinstance(event, ProtocolViolation) and event.kind == "line_too_long"
        assert refused == too_long, (len(line), event)

    @rule(body=BODY, end=_DATA_ENDS, cuts=CUTS)
    def data(self, body, end, cuts):
        """DATA and a body that may hide a fake end of data or smuggled commands."""
        self.send(b"DATA\r\n" + body + end, cuts)

    @rule(helo=st.booleans(), rcpts=st.lists(ADDRESSES, min_size=1, max_size=4), body=st.one_of(CLEAN_BODY, BODY),
          pipelined=st.booleans(), cuts=CUTS)
    def transaction(self, helo, rcpts, body, pipelined, cuts):
        """A whole transaction, as one pipelined write or a command at a time."""
        self._transaction(helo, rcpts, body, pipelined, cuts)

    @rule(rcpts=st.lists(ADDRESSES, min_size=1, max_size=4), body=CLEAN_BODY, pipelined=st.booleans(),
          chunked=st.booleans(), cuts=CUTS)
    def honest_transaction(self, rcpts, body, pipelined, chunked, cuts):
        """What most clients send: the policy, not the framing, decides these."""
        self._transaction(True, rcpts, body, pipelined, cuts, chunked=chunked)

    def _transaction(self, helo, rcpts, body, pipelined, cuts, *, chunked=False):
        steps = [b"EHLO client.example\r\n"] if helo else []
        steps += [b"MAIL FROM:<a@example.org>\r\n"] + [f"RCPT TO:<{r}>\r\n".encode() for r in rcpts]
        if chunked:     # the same octets in two BDAT chunks, unstuffed as RFC 3030 sends them
            octets = unstuff(body)
            half = len(octets) // 2
            steps += [b"BDAT %d\r\n" % half + octets[:half],
                      b"BDAT %d LAST\r\n" % (len(octets) - half) + octets[half:]]
        else:
            steps += [b"DATA\r\n", body + b".\r\n" if body.endswith(b"\r\n") or not body else body + b"\r\n.\r\n"]
        if pipelined:
            self.send(b"".join(steps), cuts)
        else:
            for step in steps:
                self.send(step, cuts)

    @rule(chunks=st.lists(st.tuples(st.one_of(BODY, CLEAN_BODY), st.integers(min_value=-2, max_value=2)),
                          min_size=1, max_size=4),
          envelope=st.booleans(), last=st.booleans(), tail=st.one_of(st.just(b""), COMMAND), cuts=CUTS)
    def bdat(self, chunks, envelope, last, tail, cuts):
        """BDAT chunks (RFC 3030), some announcing a few octets more or less than they carry."""
        out = [b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"] if envelope else []
        for i, (octets, lie) in enumerate(chunks):
            final = b" LAST" if last and i == len(chunks) - 1 else b""
            out.append(b"BDAT %d%s\r\n" % (max(0, len(octets) + lie), final) + octets)
        self.send(b"".join(out) + tail, cuts)

    @rule(domain=DOMAINS, then=st.lists(COMMAND, max_size=3), cuts=CUTS)
    def helo_mid_transaction(self, domain, then, cuts):
        """RFC 5321 4.1.4: an accepted HELO/EHLO resets the transaction, a refused one leaves it open."""
        self.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n" + f"EHLO {domain}\r\n".encode()
                  + b"".join(then), cuts)

    @rule(behind=st.lists(COMMAND, min_size=1, max_size=4), cuts=CUTS)
    def starttls_injection(self, behind, cuts):
        """Commands pipelined in plaintext behind STARTTLS (CVE-2011-0411): never run after a 220."""
        self.send(b"STARTTLS\r\n" + b"".join(behind), cuts)

    @rule(data=st.binary(max_size=1500), cuts=CUTS)
    def raw_bytes(self, data, cuts):
        self.send(data, cuts)

    @precondition(lambda self: len(self.session.trace) > 20)    # let most sessions run a while first
    @rule()
    def quit(self):
        self.send(b"QUIT\r\n", None)

    @precondition(lambda self: len(self.session.trace) > 20)
    @rule()
    def hang_up(self):
        self.session.eof()

    @precondition(lambda self: len(self.session.trace) > 20)
    @rule()
    def time_out(self):
        """The daemon's timeouts and shutdown: close() out of turn, whatever is pending."""
        self.session.time_out()

    # --- invariants ------------------------------------------------------------------------------
    @invariant()
    def silent_once_over(self):
        """After 421, 221 or the client's EOF the machine hands out nothing more (pump() asserts so)."""
        s = self.session
        if s.gone or s.ended:
            s.feed(b"NOOP\r\nMAIL FROM:<a@example.org>\r\nQUIT\r\n")

    def teardown(self):
        session = getattr(self, "session", None)
        if session is None:
            return
        for sizes in (None, [1, 7, 2, 64, 3], [500]):
            assert_same_session(session, replay(session, sizes))


TestHostileClient = HostileClient.TestCase
TestHostileClient.settings = settings(max_examples=500, stateful_step_count=30, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow,
                                                             HealthCheck.data_too_large])


def test_closed_session_buffers_nothing_more():
    """Once closed (221 here), bytes fed to the machine must not pile up in it (the driver checks)."""
    session = Session(Limits(), Policy())
    session.feed(b"EHLO client.example\r\nQUIT\r\n")
    assert session.gone and session.conn.closed
    for _ in range(16):
        session.feed(b"x" * 4096)
    assert session.conn.buffered == 0
