"""Coverage-guided fuzz target for vipd's SMTP parsers and server machine (atheris / libFuzzer).

Run by hand (see README.md beside this file):

    python tests/fuzz/fuzz_parsers.py -max_total_time=600 tests/fuzz/corpus

An input is ``<target byte> <header> <payload>``; the target byte picks what the payload is fed to:

    p  parse_command (one command line)           header: none
    l  LineReader, cut into writes                 header: limits (2 bytes), cuts (1 byte)
    d  DataReader, cut into writes                 header: limits (2 bytes), cuts (1 byte)
    c  ChunkReader (BDAT), cut into writes         header: limits (2), cuts (1), chunk count (1);
                                                   then one size byte per chunk, then the octets
    s  a whole ServerConnection session            header: limits (2), policy (4), cuts (1)
    r  ReplyReader (what a backend sends back)     header: cuts (1 byte)

Any other first byte picks one of these by its value modulo 6. Every target checks its output against
a plain model or the session invariants of ``smtp_driver``; an AssertionError or any exception other
than a documented one is a finding.
"""

from __future__ import annotations

import contextlib
import os
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)    # run as a script, the shared driver is not importable otherwise

try:
    import atheris
except ImportError:               # the corpus replay in the test suite runs the target without it
    atheris = None

# Coverage is only worth collecting for vipd's own code, and only when fuzzing.
with atheris.instrument_imports() if atheris is not None and __name__ == "__main__" else contextlib.nullcontext():
    from vipd.smtp import replies
    from vipd.smtp.client import MAX_REPLY_LINES, RemoteProtocolError, ReplyReader, mail_command, rcpt_command
    from vipd.smtp.commands import Command, Ehlo, Helo, MailFrom, RcptTo, Unknown, parse_command
    from vipd.smtp.lines import ChunkReader, DataReader, LineReader
    from vipd.smtp.replies import Reply

from fuzz.smtp_driver import (END_OF_DATA, Policy, Session, assert_same_session, limits_from_bytes,
                              replay)

MAX_MESSAGE = 1000
_CATALOGUE = frozenset(v for v in vars(replies).values() if isinstance(v, Reply))
_CONTROL = frozenset(range(0x09)) | frozenset(range(0x0A, 0x20)) | {0x7F}


def cut_sizes(seed: int) -> list[int] | None:
    """Write sizes from one byte: 0 is one write; small seeds give tiny writes (CRLF split everywhere)."""
    if seed == 0:
        return None
    return [(seed * (i + 3) * 7919) % (seed % 61 + 1) + 1 for i in range(8)]


def pieces(data: bytes, sizes: list[int] | None):
    if sizes is None:
        yield data
        return
    i = k = 0
    while i < len(data):
        step = sizes[k % len(sizes)]
        yield data[i:i + step]
        i += step
        k += 1


# --- parse_command ------------------------------------------------------------------------------------
def check_parse(line: bytes) -> None:
    result = parse_command(line, max_message_bytes=MAX_MESSAGE)
    if isinstance(result, Reply):
        assert result in _CATALOGUE, result
        assert 500 <= result.code < 600 and result.status is not None, result
        return
    assert isinstance(result, Command), result
    # Only clean ASCII may become a command; anything else must have been refused above.
    assert line.isascii() and not _CONTROL.intersection(line), (line, result)
    if isinstance(result, (Helo, Ehlo)):
        assert result.domain and " " not in result.domain, result
    elif isinstance(result, MailFrom):
        # What the relay sends a backend must be one line that says the same thing.
        wire = mail_command(result.address, size=result.size, body=result.body)
        assert wire.endswith(b"\r\n") and wire.count(b"\n") == 1 and b"\r" not in wire[:-2], wire
        again = parse_command(wire[:-2], max_message_bytes=MAX_MESSAGE)
        assert isinstance(again, MailFrom) and again.address.text == result.address.text, (wire, again)
        assert (again.address.local, again.address.domain) == (result.address.local, result.address.domain)
        assert (again.size, again.body) == (result.size, result.body)
    elif isinstance(result, RcptTo):
        wire = rcpt_command(result.address)
        assert wire.endswith(b"\r\n") and wire.count(b"\n") == 1 and b"\r" not in wire[:-2], wire
        again = parse_command(wire[:-2], max_message_bytes=MAX_MESSAGE)
        assert isinstance(again, RcptTo) and again.address.text == result.address.text, (wire, again)
        assert (again.address.local, again.address.domain) == (result.address.local, result.address.domain)
    elif isinstance(result, Unknown):
        assert len(result.verb) <= 32, result


# --- LineReader ---------------------------------------------------------------------------------------
def model_lines(data: bytes, max_line: int) -> list[bytes | Reply]:
    """lines.py's rules read plainly: one item per LF, judged on the whole line."""
    out: list[bytes | Reply] = []
    for line in data.split(b"\n")[:-1]:
        if len(line) + 1 > max_line:
            out.append(replies.LINE_TOO_LONG)
        elif not line.endswith(b"\r"):
            out.append(replies.BARE_LF_COMMAND)
        elif b"\r" in line[:-1] or b"\x00" in line:
            out.append(replies.BAD_CHARACTERS)
        else:
            out.append(line[:-1])
    return out


def check_lines(header: bytes, data: bytes) -> None:
    max_line = limits_from_bytes(header[:2]).max_command_line_bytes
    reader = LineReader(max_line)
    buf = bytearray()
    got: list[bytes | Reply] = []
    for piece in pieces(data, cut_sizes(header[2:3][0] if len(header) > 2 else 0)):
        buf += piece
        while (item := reader.next_line(buf)) is not None:
            got.append(item)
        assert len(buf) <= max_line, f"{len(buf)} bytes held, limit {max_line}"
    assert got == model_lines(data, max_line), (got, data)


# --- DataReader ---------------------------------------------------------------------------------------
def judge_body(body: bytes, max_bytes: int, max_line: int, reject_nul: bool) -> tuple[Reply | None, int]:
    """The verdict and unstuffed size for a body ending in CRLF (the end marker's first two octets)."""
    size = len(body) - body.count(b"\r\n.") - body.startswith(b".")
    crlf = body.count(b"\r\n")
    if reject_nul and b"\x00" in body:
        return replies.NUL_IN_DATA, size
    if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
        return replies.BARE_LINE_ENDING, size
    if size > max_bytes:
        return replies.TOO_BIG, size
    # RFC 5321 4.5.3.1.6: CRLF counts, the dot added for transparency does not.
    if max_line and any(len(line) + 2 - line.startswith(b".") > max_line for line in body.split(b"\r\n")[:-1]):
        return replies.DATA_LINE_TOO_LONG, size
    return None, size


def check_data(header: bytes, data: bytes) -> None:
    lim = limits_from_bytes(header[:2])
    reader = DataReader(lim.max_message_bytes, lim.max_text_line_bytes, lim.reject_nul)
    buf = bytearray()
    fed = 0
    chunks: list[bytes] = []
    done = False
    for piece in pieces(data, cut_sizes(header[2:3][0] if len(header) > 2 else 0)):
        buf += piece
        fed += len(piece)
        while not done:
            chunk, done = reader.read(buf)
            if chunk is not None:
                chunks.append(chunk.data)
            elif not done:
                break
        if done:
            break
        assert len(buf) <= len(END_OF_DATA), f"{len(buf)} bytes held in DATA"
    handed = b"".join(chunks)
    if data.startswith(b".\r\n"):
        body = b""                    # RFC 5321 4.1.1.4: the CRLF before the dot is DATA's own
    else:
        end = data.find(END_OF_DATA)
        if end < 0:
            assert not done, data
            assert data.startswith(handed), "handed out bytes the client did not send"
            return
        body = data[:end + 2]
    assert done, data
    assert fed - len(buf) == len(body) + 3, "DATA ended somewhere else than at the first CRLF.CRLF"
    error, size = judge_body(body, lim.max_message_bytes, lim.max_text_line_bytes, lim.reject_nul)
    assert (reader.error, reader.size) == (error, size), (reader.error, reader.size, error, size, body)
    if error is None:
        assert handed == body, (handed, body)
    else:
        assert body.startswith(handed), "a refused body was handed out past its fault, or changed"


# --- ChunkReader (BDAT) --------------------------------------------------------------------------------
def judge_chunks(raw: bytes, max_bytes: int, max_line: int, reject_nul: bool) -> Reply | None:
    """DATA's rules on a BDAT message's octets, its last line as forwarded (with the CRLF added)."""
    crlf = raw.count(b"\r\n")
    if reject_nul and b"\x00" in raw:
        return replies.NUL_IN_DATA
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
        return replies.BARE_LINE_ENDING
    if len(raw) > max_bytes:
        return replies.TOO_BIG
    if max_line:
        *done, last = raw.split(b"\n")
        if any(len(line) + 1 > max_line for line in done) or (last and len(last) + 2 > max_line):
            return replies.DATA_LINE_TOO_LONG
    return None


def check_chunks(header: bytes, data: bytes) -> None:
    lim = limits_from_bytes(header[:2])
    count = 1 + (header[3] % 4 if len(header) > 3 else 0)
    sizes, data = data[:count], data[count:]
    reader = ChunkReader(lim.max_message_bytes, lim.reject_nul, lim.max_text_line_bytes)
    buf = bytearray()
    out: list[bytes] = []
    feed = pieces(data, cut_sizes(header[2] if len(header) > 2 else 0))
    raw = bytearray()
    if len(sizes) < count:
        return
    for i, size in enumerate(sizes):
        reader.start(size, i == len(sizes) - 1)
        while True:
            chunk, done = reader.read(buf)
            if chunk is not None:
                out.append(chunk.data)
            if done:
                break
            piece = next(feed, None)
            if piece is None:
                return                    # the client stopped mid-chunk: nothing more to judge
            buf += piece
        raw += data[len(raw):len(raw) + size]
        assert reader.size == len(raw), (reader.size, len(raw))
    error = judge_chunks(bytes(raw), lim.max_message_bytes, lim.max_text_line_bytes, lim.reject_nul)
    assert reader.error == error, (reader.error, error, bytes(raw))
    if error is None:
        # DATA's wire form: dot-stuffed, ending in CRLF, so any backend reads the same octets.
        body = bytes(raw) if raw.endswith(b"\r\n") else bytes(raw) + b"\r\n"
        stuffed = (b"." if body.startswith(b".") else b"") + body.replace(b"\n.", b"\n..")
        assert b"".join(out) == stuffed, (b"".join(out), stuffed)


# --- ServerConnection ---------------------------------------------------------------------------------
def check_session(header: bytes, data: bytes) -> None:
    header = header.ljust(7, b"\0")
    session = Session(limits_from_bytes(header[:2]), Policy.from_bytes(header[2:6]))
    cuts = header[6]
    session.feed_in_chunks(data, cut_sizes(cuts) or [len(data) or 1])
    if cuts & 1:
        session.eof()
    # The verdicts must not depend on where TCP cut the stream.
    assert_same_session(session, replay(session))
    if len(data) <= 256:
        assert_same_session(session, replay(session, [1]))


# --- ReplyReader --------------------------------------------------------------------------------------
def check_replies(header: bytes, data: bytes) -> None:
    reader = ReplyReader()
    for piece in pieces(data, cut_sizes(header[0] if header else 0)):
        try:
            got = reader.feed(piece)
        except RemoteProtocolError:
            return                    # documented: a backend that does not speak SMTP
        for reply in got:
            assert 200 <= reply.code <= 599, reply
            assert reply.status is None or reply.status[0] == str(reply.code)[0], reply
            assert len(reply.lines()) <= MAX_REPLY_LINES, reply


_TARGETS = {ord("p"): (0, check_parse), ord("l"): (3, check_lines), ord("d"): (3, check_data),
            ord("c"): (4, check_chunks), ord("s"): (7, check_session), ord("r"): (1, check_replies)}
_BY_NUMBER = list(_TARGETS.values())


def one_input(data: bytes) -> None:
    if not data:
        return
    header_len, target = _TARGETS.get(data[0]) or _BY_NUMBER[data[0] % len(_BY_NUMBER)]
    rest = data[1:]
    if target is check_parse:
        check_parse(rest)
    else:
        target(rest[:header_len], rest[header_len:])


def main() -> None:
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris (see tests/fuzz/README.md)")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
