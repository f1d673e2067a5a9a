"""Real clients (smtplib, aiosmtplib, swaks) through a real vipd process to real sink processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import smtplib
import subprocess
import urllib.request

import aiosmtplib
import pytest

from support import pool_config, raw_session, wait_for


def _servers(sinks):
    """Which sink got each message, in arrival order across sinks."""
    got = [(m.envelope["received_at"], s.name) for s in sinks for m in s.messages()]
    return [name for _, name in sorted(got)]


def test_smtplib_roundrobin_alternates_within_one_session(lab):
    a, b = lab.sink("a"), lab.sink("b")
    vipd = lab.vipd(pool_config(a, b))
    with vipd.smtp() as smtp:
        for i in range(6):
            smtp.sendmail("alice@example.org", ["bob@example.com"], f"Subject: {i}\r\n\r\nhello {i}\r\n")
    wait_for(lambda: len(a.messages()) + len(b.messages()) == 6, what="6 messages")
    order = _servers([a, b])
    assert all(x != y for x, y in zip(order, order[1:])), order
    assert len(a.messages()) == len(b.messages()) == 3


def test_aiosmtplib_messages_spread_over_both_servers(lab):
    a, b = lab.sink("a"), lab.sink("b")
    vipd = lab.vipd(pool_config(a, b))

    async def send() -> list:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=vipd.port(), local_hostname="client.test")
        await client.connect()
        out = []
        for i in range(4):
            out.append(await client.sendmail("a@example.org", ["b@example.com"],
                                             f"Subject: {i}\r\n\r\nbody {i}\r\n"))
        await client.quit()
        return out

    results = asyncio.run(send())
    assert all(r[1].startswith("2.0.0 Ok") for r in results), results
    wait_for(lambda: len(a.messages()) + len(b.messages()) == 4)
    assert len(a.messages()) == 2 and len(b.messages()) == 2


@pytest.mark.skipif(shutil.which("swaks") is None and not os.environ.get("CI"),
                    reason="swaks not installed (tests/run.sh installs it)")
def test_swaks_through_the_vip(lab):
    a, b = lab.sink("a"), lab.sink("b")
    vipd = lab.vipd(pool_config(a, b))
    for i in range(2):
        out = subprocess.run(["swaks", "--server", f"127.0.0.1:{vipd.port()}", "--helo", "client.test",
                              "--from", "a@example.org", "--to", "b@example.com", "--pipeline",
                              "--header", f"Subject: swaks {i}", "--body", "sent by swaks"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "250 2.0.0 Ok: queued as" in out.stdout
    wait_for(lambda: len(a.messages()) + len(b.messages()) == 2)
    assert len(a.messages()) == 1 and len(b.messages()) == 1
    msg = (a.messages() + b.messages())[0]
    assert b"sent by swaks" in msg.body


def test_pipelined_envelope_gets_ordered_replies(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a))
    got = raw_session(vipd.port(), b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n"
                      b"RCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n", expect_replies=5)
    assert [line[:3] for line in got] == [b"250", b"250", b"250", b"250", b"354"], got
    assert got[1].startswith(b"250 2.1.0") and got[2].startswith(b"250 2.1.5")


def test_pipelined_whole_transaction_in_one_write(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a))
    got = raw_session(vipd.port(), b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n"
                      b"RCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
                      b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n", expect_replies=7)
    assert [line[:3] for line in got] == [b"250", b"250", b"250", b"250", b"354", b"250", b"221"], got
    assert b"queued as" in got[5]
    [msg] = wait_for(lambda: a.messages())
    assert msg.envelope["rcpt_to"] == ["b@example.com", "c@example.com"]
    assert msg.body.endswith(b"Subject: p\r\n\r\nbody\r\n")


def test_backend_rcpt_verdict_reaches_the_client(lab):
    a = lab.sink("a", "--reject-rcpt", "^nobody@")
    vipd = lab.vipd(pool_config(a))
    with vipd.smtp() as smtp:
        smtp.ehlo()
        smtp.mail("a@example.org")
        code, text = smtp.rcpt("nobody@example.com")
        assert code == 550 and text.startswith(b"5.1.1"), (code, text)
        assert smtp.rcpt("somebody@example.com")[0] == 250
        code, _ = smtp.data(b"Subject: x\r\n\r\nx\r\n")
        assert code == 250
    [msg] = wait_for(lambda: a.messages())
    assert msg.envelope["rcpt_to"] == ["somebody@example.com"]


def test_received_header_and_xclient_reach_the_backend(lab):
    a = lab.sink("a", "--xclient-from", "127.0.0.0/8")
    vipd = lab.vipd(pool_config(a))
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: r\r\n\r\nx\r\n")
    [msg] = wait_for(lambda: a.messages())
    assert msg.body.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby mx.vipd.test (vipd)")
    assert msg.envelope["xclient"]["ADDR"] == "127.0.0.1"
    assert msg.envelope["xclient"]["HELO"] == "client.test"
    assert msg.envelope["helo"] == "client.test"


def test_no_xclient_to_a_backend_that_does_not_trust_us(lab):
    a = lab.sink("a")          # offers no XCLIENT to anyone
    vipd = lab.vipd(pool_config(a))
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: r\r\n\r\nx\r\n")
    [msg] = wait_for(lambda: a.messages())
    assert msg.envelope["xclient"] == {}
    assert msg.envelope["helo"] == "mx.vipd.test"


def test_mailertable_routes_and_splits_a_transaction(lab, tmp_path):
    a, b = lab.sink("a"), lab.sink("b")
    (tmp_path / "mailertable").write_text("example.net other\n.sub.example.net other\n")
    text = pool_config(a, extra_vip='routes = "mailertable"') + f"""
[pool.other]
servers = ["{b.address}"]
"""
    vipd = lab.vipd(text)
    with vipd.smtp() as smtp:
        refused = smtp.sendmail("a@example.org", ["x@example.com", "y@example.net", "z@deep.sub.example.net"],
                                "Subject: split\r\n\r\nsplit body\r\n")
        assert refused == {}
    [ma] = wait_for(lambda: a.messages())
    [mb] = wait_for(lambda: b.messages())
    assert ma.envelope["rcpt_to"] == ["x@example.com"]
    assert mb.envelope["rcpt_to"] == ["y@example.net", "z@deep.sub.example.net"]
    assert ma.body.endswith(b"split body\r\n") and mb.body.endswith(b"split body\r\n")


def test_long_command_line_is_refused_and_session_goes_on(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a))
    got = raw_session(vipd.port(), b"EHLO client.test\r\nNOOP " + b"x" * 5000 + b"QUIT\r\nNOOP\r\nQUIT\r\n",
                      expect_replies=4)
    assert got[0].startswith(b"250 ")
    assert got[1] == b"500 5.5.2 Line too long"
    assert got[2].startswith(b"250 2.0.0") and got[3].startswith(b"221 2.0.0")


def test_unknown_command_and_bad_sequence(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a))
    got = raw_session(vipd.port(), b"FOO bar\r\nMAIL FROM:<a@b.example>\r\nEHLO c.test\r\n"
                      b"RCPT TO:<x@y.example>\r\nDATA\r\nVRFY root\r\nEXPN staff\r\nQUIT\r\n", expect_replies=8)
    codes = [line[:9] for line in got]
    assert codes == [b"500 5.5.1", b"503 5.5.1", b"250 ENHAN", b"503 5.5.1", b"503 5.5.1",
                     b"502 5.5.1", b"502 5.7.0", b"221 2.0.0"], got


def test_max_sessions_answers_421(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, extra_vip="max_sessions = 2"))
    first, second = vipd.smtp(), vipd.smtp()
    try:
        with pytest.raises(smtplib.SMTPConnectError) as err:
            vipd.smtp()
        assert err.value.smtp_code == 421 and err.value.smtp_error.startswith(b"4.3.2")
    finally:
        first.quit()
        second.quit()
    with vipd.smtp() as third:           # a freed slot is usable again
        assert third.noop()[0] == 250


def test_metrics_endpoint(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a))
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: m\r\n\r\nx\r\n")
    wait_for(lambda: a.messages())
    text = urllib.request.urlopen(f"http://127.0.0.1:{vipd.admin_port}/metrics", timeout=10).read().decode()
    assert 'vipd_sessions_total{listener="mx"} 1.0' in text
    assert 'vipd_messages_total{outcome="relayed"} 1.0' in text
    assert f'vipd_server_selected_total{{pool="incoming",server="{a.address}"}} 1.0' in text
    assert "vipd_transaction_duration_seconds_bucket" in text
    assert 'vipd_replies_total{code="250",listener="mx"}' in text
    assert f'vipd_backend_delivery_duration_seconds_count{{pool="incoming",server="{a.address}"}} 1.0' in text


def test_logs_one_line_per_transaction_and_session(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a))
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: l\r\n\r\nx\r\n")
        smtp.sendmail("c@example.org", ["d@example.com"], "Subject: l\r\n\r\ny\r\n")
    log = wait_for(lambda: "session client=" in vipd.log() and vipd.log())
    relayed = [ln for ln in log.splitlines() if " relayed " in ln]
    assert len(relayed) == 2
    assert "from=<a@example.org>" in relayed[0] and "to=<b@example.com>" in relayed[0]
    assert "dsn=2.0.0" in relayed[0] and f"servers=incoming/{a.address}" in relayed[0]
    [session] = [ln for ln in log.splitlines() if "session client=" in ln]
    assert "txns=2" in session and "msgs=2/0/0" in session and "term=--" in session


def test_no_backend_gives_4xx_never_250(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a))
    a.proc.stop()
    with vipd.smtp() as smtp:
        smtp.ehlo()
        smtp.mail("a@example.org")
        code, text = smtp.rcpt("b@example.com")
    assert code == 451 and text.startswith(b"4.4.1")


def test_ipv6_listener(lab):
    try:
        socket_ok = __import__("socket").socket(__import__("socket").AF_INET6)
        socket_ok.bind(("::1", 0))
        socket_ok.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    a = lab.sink("a")
    text = pool_config(a).replace('listen = ["127.0.0.1:0"]', 'listen = ["127.0.0.1:0", "[::1]:0"]')
    vipd = lab.vipd(text)
    assert len(vipd.ports["mx"]) == 2
    with smtplib.SMTP("::1", vipd.ports["mx"][1], local_hostname="client.test", timeout=10) as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: v6\r\n\r\nx\r\n")
    [msg] = wait_for(lambda: a.messages())
    assert msg.body.startswith(b"Received: from client.test ([::1])")


def test_relay_backend_forwards_to_its_next_hop(lab):
    import re as _re

    from support import PYTHON, start
    final = lab.sink("final")
    log = lab.tmp / "relay.log"
    relay = start("relay", [PYTHON, "-m", "backends.relay", "--listen", "127.0.0.1:0", "--next", final.address,
                            "--xclient-from", "127.0.0.0/8"], log)
    lab.procs.append(relay)
    port = int(wait_for(lambda: _re.search(r"listening on [\d.]+:(\d+)", relay.text())).group(1))

    class _Relay:
        address = f"127.0.0.1:{port}"

    vipd = lab.vipd(pool_config(_Relay))
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: via relay\r\n\r\nrelayed body\r\n")
    [msg] = wait_for(lambda: final.messages())
    assert msg.envelope["rcpt_to"] == ["b@example.com"]
    # Two trace headers: the relay's, then vipd's (which the relay got with XCLIENT facts).
    assert msg.body.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby relay.vipd.test")
    assert b"by mx.vipd.test (vipd)" in msg.body and msg.body.endswith(b"relayed body\r\n")


def test_backend_connections_are_reused_across_transactions_and_sessions(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a))
    for _ in range(3):
        with vipd.smtp() as smtp:
            for i in range(3):
                smtp.sendmail("a@example.org", ["b@example.com"], f"Subject: {i}\r\n\r\nx\r\n")
    got = wait_for(lambda: len(a.messages()) == 9 and a.messages())
    assert len({m.envelope["connection"] for m in got}) == 1


def test_idle_backend_connections_expire(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, extra_pool="idle_timeout_seconds = 0.5"))
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: 1\r\n\r\nx\r\n")
        import time as _time
        _time.sleep(2.0)                      # longer than the idle timeout plus a sweep
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: 2\r\n\r\nx\r\n")
    got = wait_for(lambda: len(a.messages()) == 2 and a.messages())
    assert got[0].envelope["connection"] != got[1].envelope["connection"]


def test_null_sender_and_postmaster_are_accepted(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a))
    with vipd.smtp() as smtp:
        smtp.ehlo()
        assert smtp.mail("<>")[0] == 250
        assert smtp.rcpt("<postmaster>")[0] == 250
        assert smtp.data(b"Subject: bounce\r\n\r\nbounce\r\n")[0] == 250
    [msg] = wait_for(lambda: a.messages())
    assert msg.envelope["mail_from"] == "" and msg.envelope["rcpt_to"] == ["postmaster"]


def test_backup_server_takes_over_only_when_primaries_are_gone(lab):
    primary, backup = lab.sink("primary"), lab.sink("backup")
    text = pool_config(primary).replace(
        f'servers = ["{primary.address}"]',
        f'servers = ["{primary.address}", {{ address = "{backup.address}", backup = true }}]')
    vipd = lab.vipd(text)
    with vipd.smtp() as smtp:
        for i in range(3):
            smtp.sendmail("a@example.org", ["b@example.com"], f"Subject: {i}\r\n\r\nx\r\n")
    assert len(wait_for(lambda: len(primary.messages()) == 3 and primary.messages())) == 3
    assert backup.messages() == []
    primary.proc.stop()
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: b\r\n\r\nto backup\r\n")
    [msg] = wait_for(lambda: backup.messages())
    assert msg.body.endswith(b"to backup\r\n")


def test_weights_shape_the_split(lab):
    a, b = lab.sink("a"), lab.sink("b")
    text = pool_config(a, b).replace(f'"{b.address}"', f'{{ address = "{b.address}", weight = 2 }}')
    vipd = lab.vipd(text)
    with vipd.smtp() as smtp:
        for i in range(9):
            smtp.sendmail("a@example.org", ["b@example.com"], f"Subject: {i}\r\n\r\nx\r\n")
    wait_for(lambda: len(a.messages()) + len(b.messages()) == 9)
    assert (len(a.messages()), len(b.messages())) == (3, 6)


def test_ehlo_in_a_transaction_abandons_it(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a))
    with vipd.smtp() as smtp:
        smtp.ehlo()
        smtp.mail("old@example.org")
        assert smtp.rcpt("dropped@example.com")[0] == 250
        smtp.ehlo("again.test")
        smtp.sendmail("new@example.org", ["kept@example.com"], "Subject: n\r\n\r\nx\r\n")
    [msg] = wait_for(lambda: a.messages())
    assert msg.envelope["mail_from"] == "new@example.org"
    assert msg.envelope["rcpt_to"] == ["kept@example.com"]


def test_pool_helo_name_is_what_backends_see(lab):
    a = lab.sink("a")
    vipd = lab.vipd(pool_config(a, extra_pool='helo_name = "relay.pool.test"'))
    with vipd.smtp() as smtp:
        smtp.sendmail("a@example.org", ["b@example.com"], "Subject: h\r\n\r\nx\r\n")
    [msg] = wait_for(lambda: a.messages())
    assert msg.envelope["helo"] == "relay.pool.test"
