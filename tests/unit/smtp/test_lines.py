"""LineReader (command lines) and DataReader (the DATA body): framing, limits, smuggling defences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipd.smtp import replies
from vipd.smtp.lines import BodyChunk, DataReader, LineReader, unstuff

from ._harness import stuff


# --- LineReader -------------------------------------------------------------------------------
def lines_of(reader: LineReader, *chunks: bytes) -> list[object]:
    buf = bytearray()
    out: list[object] = []
    for chunk in chunks:
        buf += chunk
        while (item := reader.next_line(buf)) is not None:
            out.append(item)
    return out


def test_line_reader_basic():
    assert lines_of(LineReader(512), b"HELO a\r\nNOOP\r\n") == [b"HELO a", b"NOOP"]


def test_line_reader_waits_for_lf():
    reader = LineReader(512)
    buf = bytearray(b"NOOP\r")
    assert reader.next_line(buf) is None
    assert buf == b"NOOP\r"                     # nothing consumed while incomplete
    buf += b"\n"
    assert reader.next_line(buf) == b"NOOP"
    assert buf == b""


def test_line_reader_split_crlf():
    assert lines_of(LineReader(512), b"NO", b"OP\r", b"\nQU", b"IT\r\n") == [b"NOOP", b"QUIT"]


@pytest.mark.parametrize("limit", [512, 2048])
def test_line_limit_includes_crlf(limit):
    """max_line counts the CRLF, as RFC 5321 4.5.3.1.4 counts it (512 octets incl. CRLF)."""
    at_limit = b"N" * (limit - 2) + b"\r\n"
    over = b"N" * (limit - 1) + b"\r\n"
    assert len(at_limit) == limit and len(over) == limit + 1
    assert lines_of(LineReader(limit), at_limit) == [b"N" * (limit - 2)]
    assert lines_of(LineReader(limit), over) == [replies.LINE_TOO_LONG]
    # Same answers whatever the chunking, even one byte at a time.
    assert lines_of(LineReader(limit), *[bytes([b]) for b in at_limit]) == [b"N" * (limit - 2)]
    assert lines_of(LineReader(limit), *[bytes([b]) for b in over]) == [replies.LINE_TOO_LONG]


def test_long_line_refused_once_and_never_truncated():
    reader = LineReader(512)
    long = b"NOOP " + b"x" * 3000 + b"QUIT\r\n"
    assert lines_of(reader, long + b"RSET\r\n") == [replies.LINE_TOO_LONG, b"RSET"]


@pytest.mark.parametrize("split", [1, 100, 511, 512, 513, 2000, 3005, 3009, 3010])
def test_long_line_any_split(split):
    data = b"NOOP " + b"x" * 3000 + b"QUIT\r\nRSET\r\n"
    assert lines_of(LineReader(512), data[:split], data[split:]) == [replies.LINE_TOO_LONG, b"RSET"]


def test_long_line_memory_is_bounded():
    reader = LineReader(512)
    buf = bytearray()
    for _ in range(100):
        buf += b"y" * 1000
        assert reader.next_line(buf) is None
        assert len(buf) <= 1000
    buf += b"\r\nQUIT\r\n"
    assert reader.next_line(buf) == replies.LINE_TOO_LONG
    assert reader.next_line(buf) == b"QUIT"


@pytest.mark.parametrize("data, expected", [
    (b"QUIT\n", replies.BARE_LF_COMMAND),
    (b"\n", replies.BARE_LF_COMMAND),
    (b"NO\rOP\r\n", replies.BAD_CHARACTERS),
    (b"NOOP\r\r\n", replies.BAD_CHARACTERS),
    (b"NO\x00OP\r\n", replies.BAD_CHARACTERS),
])
def test_bad_command_lines(data, expected):
    assert lines_of(LineReader(512), data + b"RSET\r\n") == [expected, b"RSET"]


def test_empty_line():
    assert lines_of(LineReader(512), b"\r\n") == [b""]


# --- DataReader -------------------------------------------------------------------------------
def read_all(reader: DataReader, *chunks: bytes) -> tuple[bytes, bool, bytearray, list[bytes]]:
    """Feed chunks; return (joined body, done, what is left in the buffer, the chunks handed out)."""
    buf = bytearray()
    out: list[bytes] = []
    done = False
    for chunk in chunks:
        buf += chunk
        while not done:
            piece, done = reader.read(buf)
            if piece is not None:
                assert isinstance(piece, BodyChunk)
                out.append(piece.data)
            if piece is None:
                break
    return b"".join(out), done, buf, out


def reader(max_bytes: int = 1 << 20, max_line: int = 1000, reject_nul: bool = True) -> DataReader:
    return DataReader(max_bytes, max_line, reject_nul)


def test_empty_body():
    r = reader()
    body, done, rest, _ = read_all(r, b".\r\nQUIT\r\n")
    assert (body, done, bytes(rest), r.size, r.error) == (b"", True, b"QUIT\r\n", 0, None)


def test_empty_body_split():
    r = reader()
    body, done, rest, _ = read_all(r, b".", b"\r", b"\n")
    assert (body, done, r.size, r.error) == (b"", True, 0, None)


def test_simple_body_and_leftover():
    r = reader()
    body, done, rest, _ = read_all(r, b"Subject: hi\r\n\r\nhello\r\n.\r\nMAIL FROM:<a@b>\r\n")
    assert done and body == b"Subject: hi\r\n\r\nhello\r\n"
    assert bytes(rest) == b"MAIL FROM:<a@b>\r\n"
    assert r.size == len(body) and r.error is None


def test_dot_stuffed_lines_handed_out_stuffed_and_counted_unstuffed():
    original = b".leading dot\r\n..two\r\nmiddle . dot\r\n.\r\n"   # the last line is a lone '.'
    wire = stuff(original)
    assert wire == b"..leading dot\r\n...two\r\nmiddle . dot\r\n..\r\n.\r\n"
    r = reader()
    body, done, _, _ = read_all(r, wire)
    assert done and r.error is None
    assert body == wire[:-3]                  # still stuffed
    assert unstuff(body) == original
    assert r.size == len(original)            # RFC 1870: octets after unstuffing


def test_end_marker_is_only_crlf_dot_crlf():
    r = reader(reject_nul=False)
    body, done, _, _ = read_all(r, b"a\r\n.x\r\n. \r\n.\r\n")
    assert done and body == b"a\r\n.x\r\n. \r\n"


@pytest.mark.parametrize("bad, error", [
    (b"bare\nlf\r\n", replies.BARE_LINE_ENDING),
    (b"bare\rcr\r\n", replies.BARE_LINE_ENDING),
    (b"cr at end\r", replies.BARE_LINE_ENDING),
    (b"nul\x00here\r\n", replies.NUL_IN_DATA),
    (b"\n", replies.BARE_LINE_ENDING),
    (b"\r\r\n", replies.BARE_LINE_ENDING),
])
def test_bad_body_bytes_refuse_the_message(bad, error):
    good = b"x" * 50 + b"\r\n"
    for chunks in ([good + bad + good + b".\r\n"],
                   [good, bad, good, b".\r\n"],
                   [bytes([c]) for c in good + bad + good + b".\r\n"]):
        r = reader()
        body, done, rest, pieces = read_all(r, *chunks)
        assert done and rest == b""
        assert r.error == error
        for piece in pieces:
            assert b"\x00" not in piece
            assert piece.count(b"\n") == piece.count(b"\r\n") == piece.count(b"\r")


def test_nul_allowed_when_configured():
    r = reader(reject_nul=False)
    body, done, _, _ = read_all(r, b"a\x00b\r\n.\r\n")
    assert done and r.error is None and body == b"a\x00b\r\n"


@pytest.mark.parametrize("max_line", [1000, 78])
def test_text_line_limit_includes_crlf(max_line):
    """RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including the CRLF."""
    ok = b"a" * (max_line - 2) + b"\r\n"
    too_long = b"a" * (max_line - 1) + b"\r\n"
    for body, error in ((ok, None), (too_long, replies.DATA_LINE_TOO_LONG)):
        for chunks in ([body + b".\r\n"], [bytes([c]) for c in body + b".\r\n"],
                       [body[:max_line // 2], body[max_line // 2:], b".\r\n"]):
            r = reader(max_line=max_line)
            _, done, _, _ = read_all(r, b"short\r\n", *chunks)
            assert done and r.error == error, (len(body), len(chunks))


def test_text_line_limit_does_not_count_the_stuffing_dot():
    """RFC 5321 4.5.3.1.6: '... not counting the leading dot duplicated for transparency'."""
    line = b"." + b"a" * 997 + b"\r\n"          # 1000 octets including CRLF before stuffing
    r = reader()
    body, done, _, _ = read_all(r, stuff(line))
    assert done and r.error is None and unstuff(body) == line
    too_long = b"." + b"a" * 998 + b"\r\n"       # 1001 octets
    r = reader()
    read_all(r, stuff(too_long))
    assert r.error == replies.DATA_LINE_TOO_LONG


def test_text_line_limit_off():
    r = reader(max_line=0)
    body, done, _, _ = read_all(r, b"a" * 50_000 + b"\r\n.\r\n")
    assert done and r.error is None and len(body) == 50_002


def test_long_last_line_and_long_middle_line():
    for body in (b"ok\r\n" + b"b" * 1200 + b"\r\nok\r\n", b"ok\r\n" * 300 + b"c" * 1001 + b"\r\n"):
        r = reader()
        read_all(r, body + b".\r\n")
        assert r.error == replies.DATA_LINE_TOO_LONG


@pytest.mark.parametrize("extra, error", [(0, None), (1, replies.TOO_BIG)])
def test_message_size_limit(extra, error):
    original = b"." + b"z" * 97 + b"\r\n"              # 100 octets unstuffed, 101 on the wire
    limit = 10 * len(original) - extra
    r = reader(max_bytes=limit)
    body, done, rest, _ = read_all(r, stuff(original * 10) + b"QUIT\r\n")
    assert done and bytes(rest) == b"QUIT\r\n"          # read to the dot even when too big
    assert r.error == error
    if error is None:
        assert r.size == 1000 and unstuff(body) == original * 10


def test_too_big_reads_to_the_dot():
    r = reader(max_bytes=10)
    chunks = [b"y" * 998 + b"\r\n"] * 50 + [b".\r\n", b"RSET\r\n"]
    body, done, rest, _ = read_all(r, *chunks)
    assert done and r.error == replies.TOO_BIG
    assert bytes(rest) == b"RSET\r\n"


def test_unfinished_body_keeps_the_tail():
    r = reader()
    body, done, rest, _ = read_all(r, b"hello\r\n.\r")
    assert not done
    assert body + bytes(rest) == b"hello\r\n.\r"
    assert not body.endswith(b"\r")             # a CRLF is never split between handed-out pieces


# --- unstuff ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stuffed, plain", [
    (b"", b""),
    (b"..\r\n", b".\r\n"),
    (b"a\r\n..b\r\n", b"a\r\n.b\r\n"),
    (b"...\r\n", b"..\r\n"),
    (b"a.b\r\n", b"a.b\r\n"),
])
def test_unstuff(stuffed, plain):
    assert unstuff(stuffed) == plain


_BODY_LINE = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
                                         .replace(b"\x00", b""))
_BODY_LINE = st.one_of(_BODY_LINE, _BODY_LINE.map(lambda b: b"." + b), st.just(b"."), st.just(b".."))


@settings(max_examples=150, deadline=None)
@given(st.lists(_BODY_LINE, max_size=20), st.lists(st.integers(min_value=0, max_value=3000), max_size=8))
def test_body_roundtrip_any_chunking(lines, cuts):
    original = b"".join(line + b"\r\n" for line in lines)
    wire = stuff(original)
    cuts = sorted({c % (len(wire) + 1) for c in cuts})
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)])]
    r = reader()
    body, done, rest, pieces = read_all(r, *chunks, b"NEXT\r\n")
    assert done and r.error is None and bytes(rest) == b"NEXT\r\n"
    assert unstuff(body) == original and r.size == len(original)
    assert all(p for p in pieces)               # no empty chunks handed out


def _verdict(body: bytes, max_line: int, max_bytes: int, reject_nul: bool):
    """An independent reading of the rules, for a whole body that ends in CRLF."""
    if reject_nul and b"\x00" in body:
        return replies.NUL_IN_DATA
    crlf = body.count(b"\r\n")
    if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
        return replies.BARE_LINE_ENDING
    lines = body.split(b"\r\n")[:-1]
    if sum(len(line) + 2 - line.startswith(b".") for line in lines) > max_bytes:
        return replies.TOO_BIG
    if max_line and any(len(line) + 2 > max_line + line.startswith(b".") for line in lines):
        return replies.DATA_LINE_TOO_LONG
    return None


_PIECES = st.sampled_from([b"\r\n", b".", b"a", b"bb", b"x" * 7, b"y" * 8, b"\x00", b"\n", b"\r"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=20).map(b"".join), st.sampled_from([0, 5, 10, 12]),
       st.sampled_from([5, 20, 1000]), st.booleans(),
       st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_verdict_matches_the_rules_whatever_the_chunking(body, max_line, max_bytes, reject_nul, cuts):
    wire = body + b"\r\n.\r\n"
    if wire.find(b"\r\n.\r\n") != len(body) or wire.startswith(b".\r\n"):
        return                                  # the body would end earlier: not this test's subject
    points = sorted({c for c in cuts if 0 < c < len(wire)})
    r = reader(max_bytes=max_bytes, max_line=max_line, reject_nul=reject_nul)
    joined, done, rest, _ = read_all(r, *[wire[a:b] for a, b in zip([0, *points], [*points, len(wire)])])
    assert done and rest == b""
    assert r.error == _verdict(body + b"\r\n", max_line, max_bytes, reject_nul)
    assert r.size == len(body) + 2 - body.count(b"\r\n.") - body.startswith(b".")
    if r.error is None:
        assert joined == body + b"\r\n"


@pytest.mark.parametrize("dotted", [False, True])
@pytest.mark.parametrize("octets", [11, 12, 13, 14])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_line_limit_boundary_every_split(dotted, octets, where):
    """max_line=12: a line of 12 octets (13 if it starts with the stuffing dot) passes, one more fails,
    wherever the line sits and wherever the stream is cut (one or two cuts)."""
    line = (b"." if dotted else b"") + b"L" * (octets - 2 - dotted) + b"\r\n"
    assert len(line) == octets
    body = {"first": line + b"ab\r\n", "middle": b"ab\r\n" + line + b"cd\r\n", "last": b"ab\r\n" + line}[where]
    expected = None if octets <= 12 + dotted else replies.DATA_LINE_TOO_LONG
    assert _verdict(body, 12, 1000, True) == expected
    wire = body + b".\r\n"
    splits = [()] + [(i,) for i in range(1, len(wire))] + [(i, j) for i in range(1, len(wire), 3)
                                                           for j in range(i + 1, len(wire), 2)]
    for cut in splits:
        points = [0, *cut, len(wire)]
        r = reader(max_line=12)
        _, done, _, _ = read_all(r, *[wire[a:b] for a, b in zip(points, points[1:])])
        assert done and r.error == expected, cut
