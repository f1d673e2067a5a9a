"""Real sendmail (Debian's 8.17) as a backend: instances built by ``backends.sendmail`` relay to the project's
sinks as the email DMZ's layers do, refuse relaying, honour the access map, route by mailertable, start in
well under a few seconds, and stop leaving no process behind.

Needs root and the Debian packages sendmail-bin, sendmail-cf and m4 (tests/run.sh installs them). These tests
never install anything: any configure of the sendmail packages kills every sendmail on the machine. Without
them the tests skip, except in CI, where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from support import ROOT, Lab, wait_for

from backends.sendmail import SendmailInstance, Settings, SettingsError, free_port, missing
from backends.sendmail.mc import PAPER_BANNER, render_mc

SENDER = "alice@example.org"
OUTSIDER = "127.0.0.3"  # 127.0.0.1 may always relay: sendmail's rules hard-code it as "originated locally"
START_BUDGET_SECONDS = 5.0


def _message(subject: str) -> bytes:
    return f"From: {SENDER}\r\nSubject: {subject}\r\n\r\nhello from the sendmail test\r\n".encode()


def _smtp(instance: SendmailInstance, source: str = "127.0.0.1") -> smtplib.SMTP:
    return smtplib.SMTP(instance.host, instance.port, local_hostname="client.test", timeout=30,
                        source_address=(source, 0))


@pytest.fixture
def sendmail():
    """A factory of started instances in a scratch folder; every one is stopped and the folder removed."""
    lacks = missing()
    if lacks:
        why = f"sendmail cannot run here (missing: {', '.join(lacks)}); tests/run.sh installs sendmail-bin sendmail-cf m4"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    # Not pytest's tmp_path: it sits under a 0700 folder, and the daemon, running as ``mail``, must reach its queue.
    root = Path(tempfile.mkdtemp(prefix="vipd-sendmail-"))
    os.chmod(root, 0o755)
    started: list[SendmailInstance] = []

    def start(role: str, name: str | None = None, **settings) -> SendmailInstance:
        instance = SendmailInstance(root / (name or role), role, free_port(), **settings)
        started.append(instance)
        instance.start()
        print(f"sendmail {role} on {instance.address}: "
              + " ".join(f"{k}={v:.3f}" for k, v in instance.timings.items()))
        assert instance.timings["start_seconds"] < START_BUDGET_SECONDS, instance.timings
        return instance

    try:
        yield start
    finally:
        try:
            for instance in reversed(started):
                instance.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _incoming(sendmail, smart_host: str, **settings) -> SendmailInstance:
    return sendmail("incoming", smart_host=smart_host, relay_domains=["example.com"],
                    access={"From:spammer@bad.example": "REJECT"},
                    hosts={"example.org": "127.0.0.1", "bad.example": "127.0.0.1"}, **settings)


def test_incoming_relays_mail_for_its_domain_to_the_smart_host(lab: Lab, sendmail) -> None:
    content = lab.sink("content")
    mx = _incoming(sendmail, content.address)
    with _smtp(mx, OUTSIDER) as client:
        assert client.sendmail(SENDER, ["bob@example.com"], _message("incoming")) == {}
    messages = wait_for(content.messages, timeout=20, what="sendmail to deliver to the smart host")
    assert len(messages) == 1
    assert messages[0].envelope["mail_from"] == SENDER
    assert messages[0].envelope["rcpt_to"] == ["bob@example.com"]
    assert b"Subject: incoming" in messages[0].body
    assert b"Received: from client.test" in messages[0].body  # sendmail's own trace header
    wait_for(lambda: "stat=Sent" in mx.log(), what="the delivery line in the maillog")


def test_incoming_greets_with_the_papers_banner(sendmail) -> None:
    mx = sendmail("incoming", smart_host="127.0.0.1:9", relay_domains=["example.com"])
    with socket.create_connection((mx.host, mx.port), timeout=10) as sock:
        greeting = sock.recv(512)
    # sendmail inserts "ESMTP" after $j itself
    assert greeting == b"220 mta.vipd.test ESMTP AUTHORIZED USE ONLY! UNSOLICITED EMAIL NOT WELCOME!\r\n"


def test_relaying_to_a_foreign_domain_is_refused(lab: Lab, sendmail) -> None:
    content = lab.sink("content")
    mx = _incoming(sendmail, content.address)
    with _smtp(mx, OUTSIDER) as client, pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        client.sendmail(SENDER, ["victim@foreign.example"], _message("relay attempt"))
    code, text = refused.value.recipients["victim@foreign.example"]
    assert code == 550 and text.startswith(b"5.7.1 ") and b"Relaying denied" in text
    # relay_hosts_only: the domain's RELAY covers the host example.com, not the names under it.
    with _smtp(mx, OUTSIDER) as client:
        client.ehlo()
        client.mail(SENDER)
        code, text = client.rcpt("bob@sub.example.com")
        assert code == 550 and text.startswith(b"5.7.1 ")
    # The fact that matters in front of vipd: a proxy connecting from 127.0.0.1 may relay anywhere.
    with _smtp(mx) as client:
        client.ehlo()
        client.mail(SENDER)
        assert client.rcpt("victim@foreign.example")[0] == 250
        client.rset()
    time.sleep(1.5)  # a queue run or two, in case anything had been queued
    assert content.messages() == []


def test_access_map_and_sender_domain_checks_are_honoured(lab: Lab, sendmail) -> None:
    content = lab.sink("content")
    mx = _incoming(sendmail, content.address)
    with _smtp(mx, OUTSIDER) as client, pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        client.sendmail("spammer@bad.example", ["bob@example.com"], _message("spam"))
    # delay_checks: the sender's reject comes at RCPT, so the log line names the recipient.
    assert refused.value.recipients["bob@example.com"] == (550, b"5.7.1 <bob@example.com>... Access denied")
    log = wait_for(lambda: "Access denied" in mx.log() and mx.log(), what="the reject in the maillog")
    assert "arg1=<bob@example.com>" in log
    # No DNS here: a sender domain is known only from the instance's hosts file; others "do not exist".
    # delay_checks moves this check to RCPT as well.
    with _smtp(mx, OUTSIDER) as client:
        client.ehlo()
        assert client.mail("someone@unknown.example")[0] == 250
        code, text = client.rcpt("bob@example.com")
        assert code == 553 and text.startswith(b"5.1.8 ") and b"does not exist" in text
    time.sleep(1.5)
    assert content.messages() == []


def test_delivery_routes_by_mailertable(lab: Lab, sendmail) -> None:
    internal = lab.sink("internal-gateway")
    outbound = lab.sink("outbound")
    dl = sendmail("delivery", mailertable={"example.com": internal.address}, smart_host=outbound.address,
                  hosts={"example.org": "127.0.0.1"})
    with _smtp(dl) as client:
        refused = client.sendmail(SENDER, ["carol@example.com", "dave@elsewhere.example"], _message("routed"))
    assert refused == {}
    inside = wait_for(internal.messages, timeout=20, what="the example.com copy at the internal gateway")
    outside = wait_for(outbound.messages, timeout=20, what="the other copy at the outbound next hop")
    assert [m.envelope["rcpt_to"] for m in inside] == [["carol@example.com"]]
    assert [m.envelope["rcpt_to"] for m in outside] == [["dave@elsewhere.example"]]
    # Per-port copies of sendmail's esmtp and relay mailers carried them (8.17 has no host:port syntax).
    wait_for(lambda: f"mailer=esmtp{internal.port}," in dl.log() and f"mailer=relay{outbound.port}," in dl.log(),
             what="both deliveries in the maillog")


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def test_stop_leaves_no_process_behind(lab: Lab, sendmail) -> None:
    dead_port = free_port()  # nothing listens there: queue runs keep forking delivery attempts
    mx = _incoming(sendmail, f"127.0.0.1:{dead_port}", log_level=10)  # "stopping daemon" is logged from 10
    with _smtp(mx, OUTSIDER) as client:
        client.sendmail(SENDER, ["bob@example.com"], _message("stays queued"))
    wait_for(lambda: "Connection refused" in mx.log(), timeout=20, what="a failed delivery attempt")
    idle = _smtp(mx, OUTSIDER)  # a session left open: one more child, busy in the middle of SMTP
    idle.ehlo()
    try:
        pids = wait_for(lambda: len(p := mx.processes()) >= 2 and p, what="the daemon and a child")
        namespace = mx.pid_namespace
        assert mx.daemon_pid in pids
        began = time.monotonic()
        mx.stop()
        stop_seconds = time.monotonic() - began
    finally:
        idle.close()
    print(f"stopped {len(pids)} processes in {stop_seconds:.3f} s")
    # A PID may have been reused since; it must at least not be in sendmail's namespace any more.
    assert [pid for pid in pids if _pid_namespace(pid) == namespace] == []
    assert mx.processes() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((mx.host, mx.port), timeout=5).close()
    assert "stopping daemon" in mx.log()
    mx.stop()  # a second stop is harmless


def test_stop_kills_a_daemon_that_ignores_sigterm(sendmail) -> None:
    mx = sendmail("content", smart_host="127.0.0.1:9")
    os.kill(mx.daemon_pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    began = time.monotonic()
    mx.stop(timeout_seconds=1.0)
    assert time.monotonic() - began < 8
    assert mx.processes() == []


def test_sendmail_dies_with_the_process_that_started_it(sendmail) -> None:
    """Even SIGKILL of the owner (a test runner killed by a timeout) leaves no sendmail behind."""
    folder = Path(tempfile.mkdtemp(prefix="vipd-sendmail-")) / "owner-killed"
    folder.parent.chmod(0o755)
    owner = subprocess.Popen([sys.executable, "-m", "backends.sendmail", "--role", "content", "--port", "0",
                              "--dir", str(folder), "--smart-host", "127.0.0.1:9"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    namespace = None
    try:
        line = owner.stdout.readline()
        match = re.search(r"listening on \S+ role=content pid=(\d+)", line)
        assert match, line + owner.stdout.read()
        namespace = _pid_namespace(int(match.group(1)))
        assert namespace is not None
        owner.kill()
        owner.wait(10)
        wait_for(lambda: not _in_namespace(namespace), timeout=10, what="the namespace to empty")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        for pid in _in_namespace(namespace) if namespace else []:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder.parent, ignore_errors=True)


def _in_namespace(namespace: str) -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and _pid_namespace(int(d)) == namespace]


def test_values_that_m4_would_expand_are_refused(tmp_path: Path) -> None:
    base = {"role": "incoming", "directory": tmp_path, "port": 2525, "smart_host": "127.0.0.1:2526",
            "relay_domains": ["example.com"]}
    for field, value in [("banner", "hello esyscmd"), ("banner", "x `y'"), ("banner", "a\nb"),
                         ("banner", "see MAILER"), ("banner", "confDOMAIN_NAME"), ("hostname", "dnl.example.com"),
                         ("dnsbl_zones", ["bl.index.example"]), ("smart_host", "127.0.0.1:2526'")]:
        with pytest.raises(SettingsError):
            Settings(**{**base, field: value})
    with pytest.raises(SettingsError):
        Settings(**{**base, "access": {"From:x@y": "REJECT\nTo:z RELAY"}})
    with pytest.raises(SettingsError):
        Settings(**{**base, "relay_domains": ["example.com\nevil.example"]})
    mc_text = render_mc(Settings(**base))
    assert f"define(`confSMTP_LOGIN_MSG', `{PAPER_BANNER}')dnl" in mc_text
    assert "define(`SMART_HOST', `relay2526:[127.0.0.1]')dnl" in mc_text
