"""Hostile input over a real socket: whatever a client sends, it gets SMTP replies and nothing else,
and the daemon keeps serving everybody else."""

from __future__ import annotations

import re
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from support import wait_for

REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -][ -~]*$")


def _talk(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def _assert_only_replies(out: bytes) -> None:
    assert out.endswith(b"\r\n") or out == b""
    for line in out.split(b"\r\n")[:-1]:
        assert REPLY_LINE.match(line), line


smtp_words = st.sampled_from([b"EHLO x\r\n", b"HELO y\r\n", b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n",
                              b"DATA\r\n", b".\r\n", b"RSET\r\n", b"NOOP\r\n", b"\r\n", b"\n", b"\r", b"\x00",
                              b"MAIL FROM:<@a,@b:c@d>\r\n", b"RCPT TO:<a%b@c>\r\n", b"GET / HTTP/1.0\r\n"])
soup = st.lists(st.one_of(smtp_words, st.binary(max_size=300)), max_size=25).map(b"".join)


@settings(max_examples=40, deadline=None)
@given(data=soup)
def test_any_bytes_get_only_smtp_replies(relay, data):
    vipd, _ = relay
    out = _talk(vipd.port(), data)
    assert out.startswith(b"220 ")
    _assert_only_replies(out)


def test_daemon_keeps_serving_after_abuse(relay):
    vipd, sink = relay
    before = len(sink.messages())
    _talk(vipd.port(), b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 40)  # a TLS hello
    _talk(vipd.port(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 30)
    _talk(vipd.port(), b"A" * 200_000)                                 # one endless line
    _talk(vipd.port(), b"EHLO x\r\n" + b"NOOP\r\n" * 5000 + b"QUIT\r\n")  # a flood of pipelined commands
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: after\r\n\r\nstill serving\r\n")
    assert len(wait_for(lambda: len(sink.messages()) > before and sink.messages())) == before + 1
    assert "internal error" not in vipd.log()


def test_too_many_errors_closes_with_421(relay):
    vipd, _ = relay
    out = _talk(vipd.port(), b"BOGUS\r\n" * 30)
    lines = out.split(b"\r\n")[:-1]
    assert lines[-1].startswith(b"421 4.7.0")
    assert len(lines) == 1 + 20                  # the greeting, 19 refusals and the 421


def test_10_mb_of_random_bytes_get_500_class_replies_and_a_close(relay):
    vipd, sink = relay
    before = len(sink.messages())
    junk = __import__("random").Random(7).randbytes(10 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", vipd.port()), timeout=10) as sock:
        greeting = sock.recv(4096)
        sent, out = 0, b""
        try:
            # Write until the daemon closes on us; read what it says as we go.
            sock.settimeout(0.5)
            while sent < len(junk):
                sent += sock.send(junk[sent:sent + 65536])
                try:
                    out += sock.recv(65536)
                except TimeoutError:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    assert greeting.startswith(b"220 ")
    _assert_only_replies(out)
    codes = [line[:3] for line in out.split(b"\r\n")[:-1]]
    assert codes and all(c[:1] == b"5" for c in codes[:-1]) and codes[-1] in (b"421", b"500", b"554")
    assert sent < len(junk)                              # it stopped listening long before the end
    with vipd.smtp() as smtp:                            # and everyone else is still served
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: after junk\r\n\r\nok\r\n")
    assert len(wait_for(lambda: len(sink.messages()) > before and sink.messages())) == before + 1
