"""PROXY protocol in: vipd behind a real HAProxy (Debian's) that sends PROXY v2 headers.

The backend learns the original client (by XCLIENT), relay control judges the original client, and a
PROXY header from a source that is not a trusted balancer is never believed.
"""

from __future__ import annotations

import smtplib
import socket

import pytest

from haproxy_lab import DEFAULTS, start_haproxy
from support import Lab, wait_for

TRUSTED_CLIENT, OTHER_CLIENT = "127.0.0.5", "127.0.0.6"


def haproxy_before(lab: Lab, vip_port: int, version: str = "send-proxy-v2") -> int:
    """HAProxy in TCP mode on a free port, passing connections to vipd with a PROXY header."""
    _, port = start_haproxy(lab, f"""{DEFAULTS}
frontend smtp
    bind fd@{{fd}}
    default_backend vipd
backend vipd
    server vipd 127.0.0.1:{vip_port} {version}
""")
    return port


def smtp_from(source: str, port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30, source_address=(source, 0))


def config(sink_address: str) -> str:
    return f"""
[vip.mx]
listen = ["127.0.0.1:0"]
hostname = "mx.vipd.test"
default_pool = "incoming"
accept_proxy_from = ["127.0.0.1/32"]        # the balancer
relay_domains = ["example.com"]
trusted_networks = ["{TRUSTED_CLIENT}/32"]  # may relay anywhere; judged on the address in the header

[pool.incoming]
servers = ["{sink_address}"]
"""


@pytest.mark.parametrize("version", ["send-proxy-v2", "send-proxy"])
def test_behind_haproxy_the_original_client_is_seen_and_judged(lab: Lab, version: str) -> None:
    sink = lab.sink("a", "--xclient-from", "127.0.0.1/32")
    vipd = lab.vipd(config(sink.address))
    port = haproxy_before(lab, vipd.port(), version)
    wait_for(lambda: _listening(port), what="haproxy to listen")

    with smtp_from(TRUSTED_CLIENT, port) as s:
        s.sendmail("a@example.org", ["someone@elsewhere.example"], b"Subject: relayed\r\n\r\nok\r\n")
    stored = wait_for(lambda: sink.messages(), what="the message")[0]
    assert stored.envelope["client_ip"] == TRUSTED_CLIENT          # XCLIENT named the real client
    assert f"[{TRUSTED_CLIENT}]" in stored.body.split(b"\r\n\r\n", 1)[0].decode()   # and Received: too

    with smtp_from(OTHER_CLIENT, port) as s:
        s.ehlo()
        s.mail("a@example.org")
        code, text = s.rcpt("someone@elsewhere.example")
        assert code == 550 and text.startswith(b"5.7.1"), (code, text)   # not trusted: no relaying
        assert s.rcpt("user@example.com")[0] == 250                     # a relay domain is fine
    wait_for(lambda: f"client=[{OTHER_CLIENT}]" in vipd.log() and "via=[127.0.0.1]" in vipd.log(),
             what="the log to name the client and the balancer")


def test_a_proxy_header_from_anyone_else_is_never_believed(lab: Lab) -> None:
    sink = lab.sink("a")
    text = config(sink.address).replace('accept_proxy_from = ["127.0.0.1/32"]', 'accept_proxy_from = ["127.0.0.9/32"]')
    vipd = lab.vipd(text)
    with socket.create_connection(("127.0.0.1", vipd.port()), timeout=10, source_address=(OTHER_CLIENT, 0)) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        sock.sendall(f"PROXY TCP4 {TRUSTED_CLIENT} 127.0.0.1 40000 25\r\n".encode())
        assert f.readline()[:3] in (b"500", b"502")
        sock.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<someone@elsewhere.example>\r\n")
        assert f.readline().startswith(b"250")
        assert f.readline().startswith(b"550 5.7.1")            # judged as 127.0.0.6, not the header's claim


def test_a_trusted_balancer_that_sends_no_valid_header_is_cut_off(lab: Lab) -> None:
    sink = lab.sink("a")
    vipd = lab.vipd(config(sink.address))
    with socket.create_connection(("127.0.0.1", vipd.port()), timeout=10) as sock:
        sock.sendall(b"EHLO not-a-proxy-header\r\n")
        sock.settimeout(5)
        assert sock.recv(4096) == b""                              # closed, no SMTP said
    wait_for(lambda: "PROXY header refused" in vipd.log(), what="the log line")
    with smtp_from(OTHER_CLIENT, vipd.port()) as s:                # others are unaffected
        assert s.ehlo()[0] == 250


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("identity", ["proxy-v2", "proxy-v1"])
def test_vipd_tells_a_vipd_behind_it_who_the_client_is_with_proxy_headers(lab: Lab, identity: str) -> None:
    # Two layers, as in the email DMZ: the inner VIP trusts the outer one's PROXY headers and passes
    # the client on to its own backend with XCLIENT. Health checks send the header too.
    sink = lab.sink("a", "--xclient-from", "127.0.0.1/32")
    inner = lab.vipd(config(sink.address), name="inner")
    outer = lab.vipd(f"""
[vip.mx]
listen = ["127.0.0.1:0"]
hostname = "edge.vipd.test"
default_pool = "inner"
trusted_networks = ["{TRUSTED_CLIENT}/32"]

[pool.inner]
servers = [{{ address = "127.0.0.1:{inner.port()}", name = "inner" }}]
identity = "{identity}"
health = {{ interval_seconds = 0.3 }}

[admin]
listen = "127.0.0.1:0"
""", name="outer")
    for n in range(2):                      # two transactions: no connection is shared between clients
        with smtp_from(TRUSTED_CLIENT, outer.port()) as s:
            s.sendmail("a@example.org", ["someone@elsewhere.example"], f"Subject: {n}\r\n\r\nok\r\n".encode())
    stored = wait_for(lambda: len(sink.messages()) == 2 and sink.messages(), what="both messages")
    assert {m.envelope["client_ip"] for m in stored} == {TRUSTED_CLIENT}
    from support import Admin
    admin = Admin(outer.admin_port)  # type: ignore[arg-type]
    wait_for(lambda: (admin.server("inner", "inner")["check"] or {}).get("ok") is True, what="a passing check")
    assert "PROXY header refused" not in inner.log()
