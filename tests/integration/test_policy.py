"""Early checks over real sockets, with a real DNS server (dnsmasq) on loopback for the lists and
sender domains, and clients that bind 127.0.0.x source addresses to look listed or trusted."""

from __future__ import annotations

import os
import smtplib
import socket
import time
import urllib.request

import pytest

from dns_server import BL_ZONE, DnsServer, SilentServer, find_dnsmasq
from support import pool_config, wait_for

LISTED, CLEAN, TRUSTED, OTHER = "127.0.0.2", "127.0.0.10", "127.0.0.8", "127.0.0.5"


@pytest.fixture(scope="module")
def dns():
    if find_dnsmasq() is None and not os.environ.get("CI"):
        pytest.skip("dnsmasq not installed (tests/run.sh installs it)")
    with DnsServer() as server:
        yield server


def _config(sink, dns_server, *, extra: str = "", top: str = "") -> str:
    vip = f"""relay_domains = ["example.com"]
trusted_networks = ["{TRUSTED}/32"]
dnsbl = [{{ zone = "{BL_ZONE}" }}]
{extra}"""
    return pool_config(sink, trusted=False, extra_vip=vip,
                       top=f'nameservers = ["{dns_server.nameserver}"]\n{top}')


def _client(vipd, source: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", vipd.port(), local_hostname="client.good.example", timeout=15,
                        source_address=(source, 0))


def _send(vipd, source: str, sender: str, rcpt: str) -> tuple[int, bytes]:
    with _client(vipd, source) as smtp:
        smtp.ehlo()
        code, text = smtp.mail(sender)
        if code != 250:
            return code, text
        code, text = smtp.rcpt(rcpt)
        if code != 250:
            return code, text
        return smtp.data(b"Subject: policy\r\n\r\npolicy test\r\n")


def test_listed_client_refused_clean_client_accepted_access_ok_overrides(lab, dns, tmp_path):
    sink = lab.sink("a")
    (tmp_path / "access").write_text(f"Connect:{OTHER} OK\n")
    vipd = lab.vipd(_config(sink, dns, extra='access = "access"'))
    code, text = _send(vipd, LISTED, "a@good.example", "b@example.com")
    assert code == 554 and BL_ZONE.encode() in text and b"127.0.0.2" in text, (code, text)
    assert _send(vipd, CLEAN, "a@good.example", "b@example.com")[0] == 250
    assert len(wait_for(lambda: sink.messages())) == 1


def test_access_ok_lets_a_listed_client_through(lab, dns, tmp_path):
    sink = lab.sink("a")
    (tmp_path / "access").write_text(f"Connect:{LISTED} OK\n")
    vipd = lab.vipd(_config(sink, dns, extra='access = "access"'))
    assert _send(vipd, LISTED, "a@good.example", "b@example.com")[0] == 250


def test_delay_checks_refuses_at_rcpt_and_logs_the_recipient(lab, dns):
    sink = lab.sink("a")
    vipd = lab.vipd(_config(sink, dns, extra="delay_checks = true"))
    with _client(vipd, LISTED) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@good.example")[0] == 250
        code, text = smtp.rcpt("victim@example.com")
    assert code == 554 and BL_ZONE.encode() in text
    log = wait_for(lambda: "check=dnsbl" in vipd.log() and vipd.log())
    assert "to=<victim@example.com>" in [ln for ln in log.splitlines() if "check=dnsbl" in ln][0]


RELAY_TRICKS = [
    "user@foreign.example",
    "user%foreign.example@example.com",
    "foreign.example!user@example.com",
    "@example.com:user@foreign.example",
    "@foreign.example:user@example.com",
    '"user@foreign.example"@example.com',
    "user@[192.0.2.1]",
    "user@foreign.example.",
    "User@FOREIGN.Example",
]


def test_relay_tricks_refused_from_untrusted_accepted_from_trusted(lab, dns):
    sink = lab.sink("a")
    vipd = lab.vipd(_config(sink, dns))
    with _client(vipd, OTHER) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@good.example")[0] == 250
        for rcpt in RELAY_TRICKS:
            code, text = smtp.docmd(f"RCPT TO:<{rcpt}>")
            assert code == 550 and text.startswith(b"5.7.1"), (rcpt, code, text)
        assert smtp.rcpt("local@example.com")[0] == 250     # ours: accepted from anyone
        assert smtp.data(b"Subject: local\r\n\r\nfor a relay domain\r\n")[0] == 250
    with _client(vipd, TRUSTED) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@good.example")[0] == 250
        for rcpt in RELAY_TRICKS:
            assert smtp.docmd(f"RCPT TO:<{rcpt}>")[0] == 250, rcpt
    [msg] = wait_for(lambda: sink.messages())
    assert msg.envelope["rcpt_to"] == ["local@example.com"]


@pytest.mark.parametrize("sender,code,status", [
    ("a@good.example", 250, b"2.1.0"),
    ("a@mx-only.example", 250, b"2.1.0"),
    ("a@bad.example", 553, b"5.1.8"),
    ("unqualified", 553, None),
    ("<>", 250, b"2.1.0"),
])
def test_sender_domain_must_resolve(lab, dns, sender, code, status):
    sink = lab.sink("a")
    vipd = lab.vipd(_config(sink, dns))
    with _client(vipd, CLEAN) as smtp:
        smtp.ehlo()
        got, text = smtp.docmd(f"MAIL FROM:<{sender.strip('<>')}>")
    assert got == code, (sender, got, text)
    if status:
        assert text.startswith(status)


def test_helo_checks(lab, dns):
    sink = lab.sink("a")
    vipd = lab.vipd(_config(sink, dns))
    # From another address than ours: a client on our own address may call itself by our name.
    with socket.create_connection(("127.0.0.1", vipd.port()), timeout=10, source_address=(OTHER, 0)) as sock:
        sock.recv(1024)
        for helo, expect in [(b"EHLO under_score!\r\n", b"501"), (b"EHLO mx.vipd.test\r\n", b"550"),
                             (b"HELO [127.0.0.1]\r\n", b"550"), (b"HELO [127.0.0.5]\r\n", b"250"), (b"EHLO client.good.example\r\n", b"250")]:
            sock.sendall(helo)
            data = b""
            while not any(line[3:4] == b" " for line in data.split(b"\r\n")):
                data += sock.recv(4096)
            assert data.startswith(expect), (helo, data)


def test_dns_down_mail_flows_or_4xx_never_a_5xx(lab):
    with SilentServer() as silent:
        sink = lab.sink("a")
        vipd = lab.vipd(_config(sink, silent, extra="check_sender_domain = false"))
        started = time.monotonic()
        assert _send(vipd, LISTED, "a@good.example", "b@example.com")[0] == 250   # the list timed out
        assert time.monotonic() - started < 8
        assert "dnsbl" not in [ln for ln in vipd.log().splitlines() if "reject" in ln]
    with SilentServer() as silent:
        sink = lab.sink("b")
        vipd = lab.vipd(_config(sink, silent), name="vipd2")
        code, text = _send(vipd, CLEAN, "a@good.example", "b@example.com")
        assert code == 451 and text.startswith(b"4.4.3"), (code, text)


DMZ_ACCESS = """# the email-DMZ design's access file, unchanged but for loopback addresses
10 RELAY
192.168 RELAY
localhost RELAY
mydomain.com RELAY
127.0.0.30 RELAY
127.0.0.31 ERROR:550 This host is not welcome here
spammer.com ERROR:550 We do not accept mail from spammers
user@ ERROR:550 This mailbox is closed
discard.com DISCARD
"""


def test_the_dmz_access_file_behaves_as_sendmail_documents(lab, dns, tmp_path):
    sink = lab.sink("a")
    (tmp_path / "access").write_text(DMZ_ACCESS)
    vipd = lab.vipd(_config(sink, dns, extra='access = "access"\ncheck_sender_domain = false'))
    assert _send(vipd, "127.0.0.30", "a@good.example", "x@foreign.example")[0] == 250   # RELAY host
    code, text = _send(vipd, "127.0.0.31", "a@good.example", "b@example.com")
    assert code == 550 and b"not welcome" in text
    code, text = _send(vipd, CLEAN, "bob@spammer.com", "b@example.com")
    assert code == 550 and b"spammers" in text
    code, text = _send(vipd, CLEAN, "a@good.example", "user@example.com")
    assert code == 550 and b"closed" in text
    assert _send(vipd, CLEAN, "a@discard.com", "b@example.com")[0] == 250             # accepted...
    messages = wait_for(lambda: len(sink.messages()) == 1 and sink.messages())
    assert [m.envelope["mail_from"] for m in messages] == ["a@good.example"]          # ...and dropped
    text = urllib.request.urlopen(f"http://127.0.0.1:{vipd.admin_port}/metrics", timeout=10).read().decode()
    assert 'vipd_policy_verdicts_total{check="access_client",verdict="reject"} 1.0' in text


def test_per_client_session_limit_and_pregreet(lab, dns):
    sink = lab.sink("a")
    vipd = lab.vipd(_config(sink, dns, extra="max_sessions_per_client = 2\ngreet_delay_seconds = 0.3"))
    first, second = _client(vipd, CLEAN), _client(vipd, CLEAN)
    try:
        with pytest.raises(smtplib.SMTPConnectError) as err:
            _client(vipd, CLEAN)
        assert err.value.smtp_code == 421 and err.value.smtp_error.startswith(b"4.7.0")
        _client(vipd, OTHER).quit()                        # another address is not limited
    finally:
        first.quit()
        second.quit()
    with socket.create_connection(("127.0.0.1", vipd.port()), timeout=10) as sock:
        sock.sendall(b"EHLO too.early.example\r\n")          # before the greeting
        data = sock.recv(1024)
    assert data.startswith(b"554 5.5.1"), data


def test_connection_rate_limit_per_client(lab, dns):
    sink = lab.sink("a")
    vipd = lab.vipd(_config(sink, dns, extra="max_connections_per_client_per_minute = 3"))
    for _ in range(3):
        _client(vipd, CLEAN).quit()
    with pytest.raises(smtplib.SMTPConnectError) as err:
        _client(vipd, CLEAN)
    assert err.value.smtp_code == 421 and b"rate" in err.value.smtp_error
    _client(vipd, OTHER).quit()


def test_refused_recipient_budget_ends_the_session(lab, dns):
    sink = lab.sink("a")
    vipd = lab.vipd(_config(sink, dns, extra="max_refused_recipients = 3"))
    with _client(vipd, OTHER) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@good.example")[0] == 250
        codes = [smtp.docmd(f"RCPT TO:<u{i}@foreign.example>")[0] for i in range(3)]
    assert codes == [550, 550, 421]
    assert "term=PR" in wait_for(lambda: "session client=" in vipd.log() and vipd.log())


def test_refuse_load_answers_421_at_connect(lab, dns):
    import os as _os
    if _os.getloadavg()[0] <= 0.0:
        pytest.skip("the load average is exactly 0 here")
    sink = lab.sink("a")
    vipd = lab.vipd(_config(sink, dns, extra="refuse_load = 0.000001"))
    with pytest.raises(smtplib.SMTPConnectError) as err:
        _client(vipd, CLEAN)
    assert err.value.smtp_code == 421 and err.value.smtp_error.startswith(b"4.3.2")


def test_unknown_helo_refused_when_asked(lab, dns):
    sink = lab.sink("a")
    vipd = lab.vipd(_config(sink, dns, extra="reject_unknown_helo = true"))
    with _client(vipd, CLEAN) as smtp:
        code, text = smtp.docmd("EHLO nowhere.bad.example")
        assert code == 450 and text.startswith(b"4.7.1"), (code, text)
        assert smtp.docmd("EHLO helo.good.example")[0] == 250


def test_a_refused_ehlo_mid_transaction_keeps_the_transaction(lab, dns):
    # RFC 5321 4.1.4: only an accepted EHLO resets; a refused one leaves the transaction as it was.
    sink = lab.sink("a")
    vipd = lab.vipd(_config(sink, dns))
    with _client(vipd, CLEAN) as s:
        s.ehlo()
        assert s.mail("a@good.example")[0] == 250
        assert s.rcpt("b@example.com")[0] == 250
        code, _ = s.docmd("EHLO", "mx.vipd.test")        # our own name: refused
        assert code >= 500
        assert s.rcpt("c@example.com")[0] == 250
        assert s.data(b"Subject: kept\r\n\r\nstill one transaction\r\n")[0] == 250
    assert wait_for(lambda: sink.messages())[0].envelope["rcpt_to"] == ["b@example.com", "c@example.com"]
    assert "internal error" not in vipd.log()
