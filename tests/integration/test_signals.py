"""SIGHUP reloads without dropping sessions; SIGTERM lets transactions finish and loses nothing."""

from __future__ import annotations

import signal
import smtplib
import socket

import pytest

from support import pool_config, wait_for


def _open_transaction(vipd, rcpt: str = "b@example.com") -> smtplib.SMTP:
    smtp = vipd.smtp()
    smtp.ehlo()
    assert smtp.mail("a@example.org")[0] == 250
    assert smtp.rcpt(rcpt)[0] == 250
    return smtp


def test_sighup_changed_pool_new_transactions_use_it_inflight_finish(lab):
    a, b = lab.sink("a"), lab.sink("b")
    vipd = lab.vipd(pool_config(a))
    inflight = _open_transaction(vipd)
    vipd.config.write_text(pool_config(b))
    vipd.proc.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in vipd.log(), what="reload")
    # The transaction that started before the reload finishes where it began.
    assert inflight.data(b"Subject: before\r\n\r\nbefore\r\n")[0] == 250
    # The same session's next transaction, and a new session, use the new pool.
    inflight.sendmail("a@example.org", ["c@example.com"], "Subject: after1\r\n\r\nafter\r\n")
    inflight.quit()
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["d@example.com"], "Subject: after2\r\n\r\nafter\r\n")
    assert [m.envelope["rcpt_to"] for m in wait_for(lambda: a.messages())] == [["b@example.com"]]
    got = wait_for(lambda: len(b.messages()) == 2 and b.messages())
    assert sorted(m.envelope["rcpt_to"][0] for m in got) == ["c@example.com", "d@example.com"]


def test_sighup_with_invalid_config_keeps_the_running_one(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a))
    vipd.config.write_text(pool_config(a) + "\nbogus_key = 1\n")
    vipd.proc.signal(signal.SIGHUP)
    log = wait_for(lambda: "reload failed" in vipd.log() and vipd.log(), what="reload error")
    assert "bogus_key" in log and "unknown key" in log
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: still\r\n\r\nstill here\r\n")
    assert wait_for(lambda: a.messages())


def test_sigterm_lets_transactions_finish_and_closes_idle_sessions(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, top="grace_seconds = 20"))
    idle = vipd.smtp()
    idle.ehlo()
    busy = _open_transaction(vipd)
    vipd.proc.signal(signal.SIGTERM)
    wait_for(lambda: "stopping" in vipd.log(), what="stop")
    # The idle session was told, and new connections are refused.
    assert idle.getreply()[0] == 421
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", vipd.port()), timeout=2)
    # The transaction in flight completes and is delivered; then the session is closed with 421.
    assert busy.data(b"Subject: during stop\r\n\r\nacknowledged\r\n")[0] == 250
    assert busy.noop()[0] == 421
    assert vipd.proc.popen.wait(10) == 0
    [msg] = a.messages()
    assert b"acknowledged" in msg.body


def test_sigterm_grace_period_ends_with_421_and_nothing_acknowledged(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, top="grace_seconds = 0.5"))
    stuck = _open_transaction(vipd)
    code, _ = stuck.docmd("DATA")
    assert code == 354
    stuck.send(b"Subject: never finished\r\n\r\npartial")
    vipd.proc.signal(signal.SIGTERM)
    assert stuck.getreply()[0] == 421
    assert vipd.proc.popen.wait(10) == 0
    assert a.messages() == []
    assert "grace period over" in vipd.log()
