"""CHUNKING from clients (RFC 3030): BDAT through vipd to a backend that offers only DATA, byte for byte."""

from __future__ import annotations

import socket

from support import Lab, pool_config, wait_for


def read_reply(f) -> bytes:
    while True:
        line = f.readline()
        if line[3:4] != b"-":
            return line


def test_bdat_reaches_a_backend_without_chunking_intact(lab: Lab) -> None:
    sink = lab.sink("a")                        # the sink offers no CHUNKING: vipd relays with DATA
    vipd = lab.vipd(pool_config(sink, extra_vip="chunking = true"))
    body = (b"Subject: chunks\r\nX-Tag: bdat\r\n\r\n.a line that starts with a dot\r\n"
            b"..and two\r\n.\r\nthe line above is a lone dot, which DATA would end on\r\n" + (b"x" * 900 + b"\r\n") * 6)
    cuts = [0, 40, 41, 90, len(body) - 3, len(body)]
    with socket.create_connection(("127.0.0.1", vipd.port()), timeout=10) as sock:
        f = sock.makefile("rb")
        assert read_reply(f).startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        ehlo = b""
        while True:
            line = f.readline()
            ehlo += line
            if line[3:4] != b"-":
                break
        assert b"CHUNKING" in ehlo
        sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
        assert read_reply(f).startswith(b"250") and read_reply(f).startswith(b"250")
        for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
            last = b" LAST" if end == len(body) else b""
            sock.sendall(b"BDAT %d%s\r\n" % (end - start, last) + body[start:end])
            reply = read_reply(f)
            assert reply.startswith(b"250"), (i, reply)
        assert b"queued as" in reply
        sock.sendall(b"QUIT\r\n")
    stored = wait_for(lambda: sink.messages(), what="the message")[0]
    # The sink stores the message as it arrived after DATA, unstuffed: our Received: line, then the body.
    assert stored.body.split(b"\r\n", 3)[3].endswith(body) or stored.body.endswith(body)
    assert stored.body.count(b"\r\n.\r\n") == 1                 # the lone-dot line survived as content


def test_a_bdat_line_over_the_limit_is_refused_by_vipd(lab: Lab) -> None:
    sink = lab.sink("a")
    vipd = lab.vipd(pool_config(sink, extra_vip="chunking = true"))
    body = b"Subject: long\r\n\r\n" + b"y" * 3000 + b"\r\n"
    with socket.create_connection(("127.0.0.1", vipd.port()), timeout=10) as sock:
        f = sock.makefile("rb")
        read_reply(f)
        sock.sendall(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
        for _ in range(3):
            read_reply(f)
        sock.sendall(b"BDAT %d LAST\r\n" % len(body) + body)
        assert read_reply(f).startswith(b"550 5.6.0")
    assert sink.messages() == []
