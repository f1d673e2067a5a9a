"""Hypothesis: arbitrary bodies round-trip byte for byte through vipd to a sink (after unstuffing)."""

from __future__ import annotations

import re
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from support import wait_for

# Any bytes but CR, LF and NUL in a line; lines up to 998 octets (RFC 5321 4.5.3.1.6).
line = st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b""))
long_line = st.integers(min_value=900, max_value=998).map(lambda n: b"y" * n)
bodies = st.lists(st.one_of(line, long_line, st.sampled_from([b".", b"..", b".x", b"", b". "])),
                  max_size=40).map(lambda lines: b"".join(ln + b"\r\n" for ln in lines))


def _stuff(body: bytes) -> bytes:
    out = body.replace(b"\r\n.", b"\r\n..")
    return b"." + out if out.startswith(b".") else out


def _send(port: int, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        wire = (b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                + _stuff(body) + b".\r\nQUIT\r\n")
        sock.sendall(wire)
        data = b""
        while b"\r\n221 " not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


@settings(max_examples=40, deadline=None)
@given(body=bodies)
def test_any_body_round_trips(relay, body):
    vipd, sink = relay
    before = len(sink.messages())
    replies = _send(vipd.port(), body)
    assert b"\r\n250 2.0.0 Ok: queued as" in replies, replies
    msg = wait_for(lambda: len(sink.messages()) > before and sink.messages()[-1])
    # Our Received header ends with ";" CRLF TAB date CRLF; a body line may itself start with a space.
    header = re.match(rb"Received: [^;]*;\r\n\t[^\r\n]*\r\n", msg.body)
    assert header is not None, msg.body[:200]
    assert msg.body[header.end():] == body
