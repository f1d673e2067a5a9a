"""A backend that dies before its final reply: the transaction is replayed on another server."""

from __future__ import annotations

import smtplib

import pytest

from fakes.lenient_backend import LenientBackend
from support import pool_config, wait_for


@pytest.fixture
def crashing():
    backend = LenientBackend(drop_at_dot=True)
    try:
        yield backend
    finally:
        backend.close()


def test_failure_before_final_reply_replays_on_another_server(lab, crashing):
    good = lab.sink("good")
    text = pool_config(good).replace("servers = [", f'servers = ["{crashing.address}", ')
    vipd = lab.vipd(text)
    with vipd.smtp() as smtp:
        for i in range(4):
            smtp.sendmail("a@example.org", ["b@example.com"], f"Subject: {i}\r\n\r\nreplayed {i}\r\n")
    got = wait_for(lambda: len(good.messages()) == 4 and good.messages())
    assert sorted(m.body.rsplit(b"\r\n", 2)[-2] for m in got) == [f"replayed {i}".encode() for i in range(4)]
    assert crashing.messages == 0 and b"replayed 0" in crashing.raw


def test_no_server_left_gives_451_never_250(lab, crashing):
    text = pool_config(admin=False).replace("servers = []", f'servers = ["{crashing.address}"]')
    vipd = lab.vipd(text)
    with vipd.smtp() as smtp:
        with pytest.raises(smtplib.SMTPDataError) as err:
            smtp.sendmail("a@example.org", ["b@example.com"], "Subject: x\r\n\r\nlost backend\r\n")
    assert err.value.smtp_code == 451
    log = wait_for(lambda: " deferred " in vipd.log() and vipd.log())
    assert "dsn=4." in log


def test_a_silent_backend_times_out_and_the_transaction_moves_on(lab):
    """A backend that accepts the connection and greets, then never answers a command."""
    import socket
    import threading

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    conns = []

    def serve():
        while True:
            try:
                conn, _ = silent.accept()
            except OSError:
                return
            conns.append(conn)
            conn.sendall(b"220 silent ESMTP\r\n")     # then nothing, ever

    threading.Thread(target=serve, daemon=True).start()
    try:
        good = lab.sink("good")
        text = pool_config(good, extra_pool="greeting_timeout_seconds = 1.0\ncommand_timeout_seconds = 1.0")
        text = text.replace("servers = [", f'servers = ["127.0.0.1:{silent.getsockname()[1]}", ')
        vipd = lab.vipd(text)
        with vipd.smtp() as smtp:
            smtp.sendmail("a@example.org", ["b@example.com"], "Subject: t\r\n\r\nafter a timeout\r\n")
        [msg] = wait_for(lambda: good.messages())
        assert msg.body.endswith(b"after a timeout\r\n")
        assert "no reply within 1 s" in wait_for(lambda: "server down" in vipd.log() and vipd.log())
    finally:
        silent.close()
        for conn in conns:
            conn.close()
