"""STARTTLS on a VIP with real clients (smtplib, swaks, openssl s_client) and certificates made here."""

from __future__ import annotations

import socket
import ssl
import subprocess

import pytest

from certs import Certs, make_certs
from support import Admin, Lab, pool_config, wait_for


@pytest.fixture
def certs(tmp_path) -> Certs:
    return make_certs(tmp_path / "certs")


def tls_config(lab: Lab, sink, certs: Certs, extra_vip: str = "") -> str:
    vip = f'tls_cert = "{certs.server_cert}"\ntls_key = "{certs.server_key}"\n{extra_vip}'
    return pool_config(sink, extra_vip=vip)


def client_context(certs: Certs) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.check_hostname = False          # we connect to 127.0.0.1; the chain is what is checked
    return ctx


def test_smtplib_starttls_and_the_received_header(lab: Lab, certs: Certs) -> None:
    sink = lab.sink("a")
    vipd = lab.vipd(tls_config(lab, sink, certs))
    with vipd.smtp() as s:
        s.ehlo()
        assert s.has_extn("starttls")
        s.starttls(context=client_context(certs))
        s.ehlo()
        assert not s.has_extn("starttls")            # offered once, not inside TLS
        s.sendmail("a@example.org", ["b@example.com"], b"Subject: tls\r\n\r\nsecret\r\n")
    body = wait_for(lambda: sink.messages(), what="the message")[0].body
    received = body.split(b"\r\n\r\n", 1)[0].decode()
    assert "with ESMTPS id" in received
    assert "(using TLSv1.3 with cipher TLS_" in received
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    assert admin.metric("vipd_tls_sessions_total", listener="mx", version="TLSv1.3") == 1


def test_swaks_tls(lab: Lab, certs: Certs) -> None:
    sink = lab.sink("a")
    vipd = lab.vipd(tls_config(lab, sink, certs))
    out = subprocess.run(["swaks", "--server", f"127.0.0.1:{vipd.port()}", "--tls", "--helo", "client.test",
                          "--from", "a@example.org", "--to", "b@example.com", "--tls-verify",
                          "--tls-ca-path", str(certs.ca)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TLS started" in out.stdout
    assert wait_for(lambda: sink.messages(), what="the message")


def test_openssl_s_client_starttls_smtp(lab: Lab, certs: Certs) -> None:
    sink = lab.sink("a")
    vipd = lab.vipd(tls_config(lab, sink, certs))
    out = subprocess.run(["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{vipd.port()}",
                          "-CAfile", str(certs.ca), "-verify_return_error", "-servername", "mx.vipd.test", "-ign_eof"],
                         input="EHLO client.test\r\nQUIT\r\n", capture_output=True, text=True, timeout=60)
    assert "Verify return code: 0 (ok)" in out.stdout, out.stdout + out.stderr
    assert "250-mx.vipd.test" in out.stdout
    assert "221 2.0.0" in out.stdout


def test_plaintext_pipelined_with_starttls_is_never_answered_inside_tls(lab: Lab, certs: Certs) -> None:
    sink = lab.sink("a")
    vipd = lab.vipd(tls_config(lab, sink, certs))
    raw = socket.create_connection(("127.0.0.1", vipd.port()), timeout=10)
    try:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220 ")
        raw.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\nNOOP\r\n")           # one write: the NOOP must be dropped
        assert f.readline().startswith(b"220 2.0.0")
        tls = client_context(certs).wrap_socket(raw, server_hostname="mx.vipd.test")
        tls.settimeout(1.0)
        with pytest.raises(TimeoutError):
            tls.recv(4096)                               # nothing: the NOOP was never executed
        tls.settimeout(10)
        tls.sendall(b"EHLO client.test\r\n")
        first = tls.recv(4096)
        assert first.startswith(b"250-mx.vipd.test"), first
        tls.sendall(b"QUIT\r\n")
    finally:
        raw.close()
    wait_for(lambda: "discarded plaintext pipelined after STARTTLS" in vipd.log(), what="the log line")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # asking for TLS 1.1 is the point
def test_old_tls_versions_are_refused(lab: Lab, certs: Certs) -> None:
    sink = lab.sink("a")
    vipd = lab.vipd(tls_config(lab, sink, certs))
    ctx = client_context(certs)
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except ValueError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    import smtplib
    with vipd.smtp() as s:
        s.ehlo()
        with pytest.raises((ssl.SSLError, OSError, smtplib.SMTPServerDisconnected)):
            s.starttls(context=ctx)
    admin = Admin(vipd.admin_port)  # type: ignore[arg-type]
    wait_for(lambda: admin.metric("vipd_tls_handshake_failures_total", listener="mx") == 1, what="the count")
    # The daemon keeps serving.
    with vipd.smtp() as s:
        assert s.ehlo()[0] == 250


def test_tls_can_be_required(lab: Lab, certs: Certs) -> None:
    sink = lab.sink("a")
    vipd = lab.vipd(tls_config(lab, sink, certs, 'require_tls_for = ["secret.example"]'))
    with vipd.smtp() as s:
        s.ehlo()
        s.mail("a@example.org")
        code, text = s.rcpt("b@secret.example")
        assert (code, text[:5]) == (530, b"5.7.0")
        assert s.rcpt("b@example.com")[0] == 250           # other domains need no TLS
        s.rset()
        s.starttls(context=client_context(certs))
        s.ehlo()
        s.mail("a@example.org")
        assert s.rcpt("b@secret.example")[0] == 250


def test_bad_certificate_config_names_the_key(tmp_path, certs: Certs) -> None:
    from vipd import config
    text = pool_config(type("S", (), {"address": "127.0.0.1:25"})(),
                       extra_vip=f'tls_cert = "{certs.server_cert}"\ntls_key = "{certs.client_key}"\n')
    path = tmp_path / "vipd.toml"
    path.write_text(text)
    errors = config.check(path)
    assert len(errors) == 1 and ": vip.mx.tls_cert: cannot load " in errors[0], errors


def outer_config(inner_port: int, tls: str, extra: str = "") -> str:
    return f"""
[vip.mx]
listen = ["127.0.0.1:0"]
hostname = "edge.vipd.test"
default_pool = "inner"
trusted_networks = ["127.0.0.0/8"]

[pool.inner]
servers = ["127.0.0.1:{inner_port}"]
tls = "{tls}"
{extra}
"""


def test_starttls_to_backends_verified(lab: Lab, certs: Certs) -> None:
    sink = lab.sink("a")
    inner = lab.vipd(tls_config(lab, sink, certs), name="inner")
    outer = lab.vipd(outer_config(inner.port(), "required",
                                  f'tls_verify = true\ntls_ca = "{certs.ca}"\ntls_server_name = "mx.vipd.test"'),
                     name="outer")
    with outer.smtp() as s:
        s.sendmail("a@example.org", ["b@example.com"], b"Subject: hop\r\n\r\nencrypted between layers\r\n")
    body = wait_for(lambda: sink.messages(), what="the message")[0].body
    head = body.split(b"\r\n\r\n", 1)[0].decode()
    # The inner VIP's Received: says the outer one came over TLS.
    assert "from mx.vipd.test" in head or "from edge.vipd.test" in head
    assert "with ESMTPS" in head and "(using TLSv1." in head


def test_a_backend_with_a_certificate_we_cannot_verify_is_not_used(lab: Lab, certs: Certs, tmp_path) -> None:
    other = make_certs(tmp_path / "other")                       # a CA the inner VIP's cert is not from
    sink = lab.sink("a")
    inner = lab.vipd(tls_config(lab, sink, certs), name="inner")
    outer = lab.vipd(outer_config(inner.port(), "required",
                                  f'tls_verify = true\ntls_ca = "{other.ca}"\ntls_server_name = "mx.vipd.test"'),
                     name="outer")
    with outer.smtp() as s:
        s.ehlo()
        s.mail("a@example.org")
        code, _ = s.rcpt("b@example.com")
    assert code == 451                                           # deferred, never sent in the clear
    assert sink.messages() == []
    wait_for(lambda: "TLS handshake failed" in outer.log(), what="the log line")


def test_opportunistic_tls_falls_back_to_plaintext(lab: Lab) -> None:
    sink = lab.sink("a")                                         # offers no STARTTLS
    outer = lab.vipd(outer_config(sink.port, "opportunistic"), name="outer")
    with outer.smtp() as s:
        s.sendmail("a@example.org", ["b@example.com"], b"Subject: plain\r\n\r\nok\r\n")
    assert wait_for(lambda: sink.messages(), what="the message")
