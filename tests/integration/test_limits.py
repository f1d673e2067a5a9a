"""Limits over real sockets: timeouts, message size, large bodies that spill to disk."""

from __future__ import annotations

import hashlib
import socket
import time


from support import pool_config, wait_for


def test_idle_client_gets_421_after_command_timeout(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, extra_vip="command_timeout_seconds = 1.0"))
    with socket.create_connection(("127.0.0.1", vipd.port()), timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(b"EHLO c.test\r\n")
        sock.recv(1024)
        started = time.monotonic()
        data = sock.recv(1024)
        assert data.startswith(b"421 4.4.2"), data
        assert sock.recv(1024) == b""           # and the connection is closed
        assert 0.5 < time.monotonic() - started < 5
    log = wait_for(lambda: "term=cM" in vipd.log() and vipd.log())
    assert "session client=" in log


def test_stalled_data_gets_421_after_data_timeout_and_is_not_delivered(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, extra_vip="data_timeout_seconds = 1.0"))
    with vipd.smtp() as smtp:
        smtp.ehlo()
        smtp.mail("a@example.org")
        smtp.rcpt("b@example.com")
        assert smtp.docmd("DATA")[0] == 354
        smtp.send(b"Subject: slow\r\n\r\nhalf a message")
        assert smtp.getreply()[0] == 421
    time.sleep(0.3)
    assert a.messages() == []


def test_a_slowloris_in_data_gets_421_after_the_grace_and_is_not_delivered(lab):
    """A client that keeps the line busy (never idle long enough for data_timeout) but sends less
    than the minimum rate is closed once the grace is over."""
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, extra_vip="min_data_rate_bytes_per_second = 1000\n"
                                             "min_data_rate_grace_seconds = 1.0\ndata_timeout_seconds = 60"))
    with socket.create_connection(("127.0.0.1", vipd.port()), timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        wait_for(lambda: b"354" in sock.recv(4096), what="354")
        started = time.monotonic()
        sock.settimeout(0.2)
        reply = b""
        while b"421" not in reply and time.monotonic() - started < 10:
            try:
                sock.sendall(b"x")                   # a byte every 0.2 s: busy, but 5 bytes a second
                reply += sock.recv(1024)
            except TimeoutError:
                pass
            except OSError:
                break
        assert reply.startswith(b"421 4.4.2") and b"Data rate too low" in reply, reply
        assert 1.0 < time.monotonic() - started < 5
    assert "data too slow" in wait_for(lambda: "data too slow" in vipd.log() and vipd.log())
    assert a.messages() == []


def test_message_over_the_size_limit_is_refused_at_the_end(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, extra_vip="max_message_bytes = 100000"))
    with vipd.smtp() as smtp:
        assert "100000" in smtp.ehlo()[1].decode()
        # mail() sends no SIZE= (sendmail() would, and be refused at MAIL): only DATA's end can refuse it.
        assert smtp.mail("a@example.org")[0] == 250
        assert smtp.rcpt("b@example.com")[0] == 250
        code, text = smtp.data(b"Subject: big\r\n\r\n" + (b"y" * 900 + b"\r\n") * 200)
        assert code == 552 and text.startswith(b"5.3.4")
        # The session goes on.
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: small\r\n\r\nsmall\r\n")
    assert len(wait_for(lambda: a.messages())) == 1


def test_size_parameter_over_the_limit_is_refused_at_mail(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, extra_vip="max_message_bytes = 100000"))
    with vipd.smtp() as smtp:
        smtp.ehlo()
        code, text = smtp.mail("a@example.org", ["SIZE=200000"])
        assert code == 552 and text.startswith(b"5.3.4")


def test_large_message_spills_and_arrives_intact(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, extra_vip="max_message_bytes = 20000000"))
    body = b"".join(b"%08d " % i + b"z" * 90 + b"\r\n" for i in range(60000))   # ~6 MiB
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], b"Subject: large\r\n\r\n" + body)
    [msg] = wait_for(lambda: a.messages(), timeout=30)
    assert hashlib.sha256(msg.body.split(b"Subject: large\r\n\r\n", 1)[1]).digest() == hashlib.sha256(body).digest()
