"""Any chunking of the client's byte stream gives the same events and replies (STYLE.md section 9).

TCP may cut the stream anywhere, including inside CRLF and inside CRLF.CRLF; the machine must not care.
BodyChunk boundaries may differ, so bodies are compared joined; the partial body of a refused or
unfinished message is not compared (the adapter throws it away), but its MessageComplete (size and
error) and every reply must be the same.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vipd.smtp.lines import unstuff
from vipd.smtp.server import Limits, MessageComplete

from ._harness import Driver, normalize, stuff

LIMITS = Limits(max_command_line_bytes=512, max_text_line_bytes=100, max_message_bytes=1500,
                max_recipients=3, max_errors=12)

_ADDR = st.sampled_from([b"<a@b.example>", b"<>", b"<postmaster>", b'<"q@x"@c.example>', b"<@r:u@d.example>",
                         b"x@y.example", b"<bad"])
_LINE = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b""))
_LINE = st.one_of(_LINE, _LINE.map(lambda b: b"." + b), st.just(b"."), st.just(b""))
_NASTY = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"\x00", b"x", b"\r\n.", b".\r\n", b"abc"]),
                  max_size=30).map(b"".join)


def _body() -> st.SearchStrategy[bytes]:
    valid = st.lists(_LINE, max_size=12).map(lambda ls: stuff(b"".join(line + b"\r\n" for line in ls)))
    nasty = st.one_of(_NASTY, st.binary(max_size=200)).map(lambda b: b + b"\r\n.\r\n")
    huge = st.integers(min_value=1, max_value=30).map(lambda n: b"y" * 98 + b"\r\n" * n + b".\r\n")
    return st.one_of(valid, nasty, huge)


_STEP = st.one_of(
    st.sampled_from([b"EHLO c.example\r\n", b"HELO c\r\n", b"RSET\r\n", b"NOOP\r\n", b"DATA\r\n", b"VRFY x\r\n",
                     b"BOGUS\r\n", b"NOOP\n", b"\r\n", b"MAIL FROM:<a@b.example> SIZE=99999\r\n"]),
    _ADDR.map(lambda a: b"MAIL FROM:" + a + b"\r\n"),
    _ADDR.map(lambda a: b"RCPT TO:" + a + b"\r\n"),
    _body().map(lambda body: b"DATA\r\n" + body),
    st.integers(min_value=505, max_value=520).map(lambda n: b"NOOP " + b"z" * (n - 7) + b"\r\n"),
    st.binary(max_size=40),
)
SESSION = st.lists(_STEP, max_size=14).map(lambda steps: b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n"
                                           b"RCPT TO:<c@d.example>\r\n" + b"".join(steps))


def comparable(driver: Driver) -> list[object]:
    """The normalized trace, without the partial bodies of refused messages."""
    out = normalize(driver.trace)
    keep = []
    for i, (event, reply) in enumerate(out):
        if isinstance(event, tuple):
            follower = next((e for e, _ in out[i + 1:] if isinstance(e, MessageComplete)), None)
            if follower is None or follower.error is not None:
                continue       # unfinished or refused: how much was handed out depends on timing
        keep.append((event, reply))
    return keep


def special_cuts(stream: bytes) -> list[int]:
    """Cut points inside every CRLF and inside every CRLF.CRLF."""
    cuts = [i + 1 for i in range(len(stream) - 1) if stream[i:i + 2] == b"\r\n"]
    start = stream.find(b"\r\n.\r\n")
    while start >= 0:
        cuts.extend(range(start + 1, start + 5))
        start = stream.find(b"\r\n.\r\n", start + 1)
    return cuts


def run(stream: bytes, cuts: list[int], eof: bool) -> Driver:
    d = Driver(limits=LIMITS)
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    for a, b in zip([0, *points], [*points, len(stream)]):
        d.feed(stream[a:b])
    if eof:
        d.eof()
    return d


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(SESSION, st.data(), st.booleans())
def test_any_chunking_gives_the_same_events_and_replies(stream, data, eof):
    whole = run(stream, [], eof)
    special = special_cuts(stream)
    choices = st.integers(min_value=0, max_value=max(len(stream), 1))
    if special:
        choices = st.one_of(choices, st.sampled_from(special))
    cuts = data.draw(st.lists(choices, max_size=25), label="cuts")
    split = run(stream, cuts, eof)
    assert comparable(split) == comparable(whole)
    assert bytes(split.wire) == bytes(whole.wire)
    assert split.conn.state == whole.conn.state


@settings(max_examples=40, deadline=None)
@given(SESSION)
def test_byte_at_a_time(stream):
    whole = run(stream, [], True)
    single = run(stream, list(range(len(stream))), True)
    assert comparable(single) == comparable(whole)
    assert bytes(single.wire) == bytes(whole.wire)


_VALID_LINE = st.binary(max_size=997).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b""))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(st.lists(st.one_of(_VALID_LINE, _VALID_LINE.map(lambda b: b"." + b[:996])), max_size=10),
       st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\x00", b"")), st.data())
def test_valid_bodies_roundtrip(lines, tail, data):
    """Valid bytes (CRLF only, no NUL, lines within the limit) come out exactly as they went in."""
    original = b"".join(line + b"\r\n" for line in lines)
    if tail and b"\n" not in tail:
        original += tail                                 # a body not ending in CRLF: the client adds one
    expected = original if not original or original.endswith(b"\r\n") else original + b"\r\n"
    wire = b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n" + stuff(original)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(wire)), max_size=10), label="cuts")
    d = Driver()
    points = sorted({c for c in cuts if 0 < c < len(wire)})   # an empty chunk would mean EOF
    for a, b in zip([0, *points], [*points, len(wire)]):
        d.feed(wire[a:b])
    (body_entry,) = [e for e, _ in normalize(d.trace) if isinstance(e, tuple)] or [("body", b"")]
    (done,) = [e for e in d.events() if isinstance(e, MessageComplete)]
    assert done.error is None and done.size == len(expected)
    assert unstuff(body_entry[1]) == expected
