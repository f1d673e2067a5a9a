"""SMTP smuggling (CVE-2023-51764 class): no body ending other than CRLF.CRLF ever ends DATA.

One test per attack: each body holds a fake end of data followed by a second envelope, then the
real CRLF.CRLF. vipd must refuse the message and let nothing of it reach the backend, which here
is a deliberately lenient one (tests/fakes/lenient_backend.py) that *would* split the message.
"""

from __future__ import annotations

import socket

import pytest

from fakes.lenient_backend import LenientBackend
from support import pool_config, wait_for

ATTACKS = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
    "crlf-dot-lf": b"\r\n.\n",
    "crlf-nul-dot-crlf": b"\r\n\x00.\r\n",
}

SECOND = (b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
          b"Subject: smuggled\r\n\r\nsmuggled body\r\n")


@pytest.fixture
def backend():
    b = LenientBackend()
    try:
        yield b
    finally:
        b.close()


def _lines(sock: socket.socket, want: int) -> list[bytes]:
    buf, out = b"", []
    while len(out) < want:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\r\n")
        out += [ln for ln in lines if ln[3:4] == b" "]
    return out


@pytest.mark.parametrize("attack", list(ATTACKS), ids=list(ATTACKS))
def test_smuggled_second_message_never_reaches_the_backend(lab, backend, attack):
    text = pool_config(admin=False).replace("servers = []", f'servers = ["{backend.address}"]')
    vipd = lab.vipd(text)
    with socket.create_connection(("127.0.0.1", vipd.port()), timeout=10) as sock:
        assert _lines(sock, 1)[0].startswith(b"220")
        sock.sendall(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in _lines(sock, 4)] == [b"250", b"250", b"250", b"354"]
        sock.sendall(b"Subject: first\r\n\r\nfirst body" + ATTACKS[attack] + SECOND + b"\r\n.\r\n")
        [reply] = _lines(sock, 1)
        assert reply.startswith(b"550 5.6.0"), reply
        # The session goes on: a clean message afterwards is relayed.
        sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in _lines(sock, 3)] == [b"250", b"250", b"354"]
        sock.sendall(b"Subject: clean\r\n\r\nclean body\r\n.\r\nQUIT\r\n")
        final = _lines(sock, 2)
        assert final[0].startswith(b"250 2.0.0"), final
    wait_for(lambda: backend.messages >= 1, what="the clean message")
    assert backend.messages == 1
    assert b"smuggled" not in backend.raw
    assert b"first body" not in backend.raw
    assert b"clean body" in backend.raw


def test_vipd_never_sends_a_backend_a_bare_line_ending(lab, backend):
    text = pool_config(admin=False).replace("servers = []", f'servers = ["{backend.address}"]')
    vipd = lab.vipd(text)
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], b"Subject: x\r\n\r\n.leading dot\r\n..two\r\nend\r\n")
    wait_for(lambda: backend.messages == 1)
    raw = bytes(backend.raw)
    assert raw.count(b"\n") == raw.count(b"\r\n")
    assert b"\r\n..leading dot\r\n...two\r\n" in raw      # dot-stuffing is kept on the way out
