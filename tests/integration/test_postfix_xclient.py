"""A real Postfix backend (Debian's package, unpacked: it conflicts with sendmail-bin) learns the client
from vipd's XCLIENT and logs it as the client of the message."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import sys
from pathlib import Path

import pytest

from support import ROOT, Lab, pool_config, wait_for

CLIENT = "127.0.0.7"


@pytest.fixture
def postfix(lab: Lab):
    sys.path.insert(0, str(ROOT))
    from bench.compare import DEFAULT_CACHE
    from bench.peers import Postfix
    from bench.system import Endpoint, Unavailable
    if os.geteuid() != 0 or shutil.which("dpkg-deb") is None:
        if os.environ.get("CI"):
            pytest.fail("Postfix needs root and dpkg-deb here; CI is set: this test must run")
        pytest.skip("Postfix needs root and dpkg-deb")
    peer = Postfix()
    peer.extra_main_cf = ("smtpd_authorized_xclient_hosts = 127.0.0.0/8\n"
                          "smtpd_authorized_xforward_hosts = 127.0.0.0/8\n")
    try:
        peer.prepare(DEFAULT_CACHE)
    except Unavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Postfix is not available: {exc}")
    sink = lab.sink("behind-postfix")
    endpoint = peer.start(lab.tmp / "postfix", [Endpoint("127.0.0.1", sink.port)])
    try:
        yield peer, endpoint, sink, lab.tmp / "postfix" / "maillog"
    finally:
        peer.stop()


def test_postfix_logs_the_client_vipd_names_with_xclient(lab: Lab, postfix) -> None:
    peer, endpoint, sink, maillog = postfix
    server = type("S", (), {"address": f"127.0.0.1:{endpoint.port}"})()
    vipd = lab.vipd(pool_config(server))           # identity = "xclient", the default
    with smtplib.SMTP("127.0.0.1", vipd.port(), local_hostname="client.test", timeout=30,
                      source_address=(CLIENT, 0)) as s:
        s.sendmail("a@example.org", ["b@example.com"], b"Subject: through postfix\r\n\r\nhello\r\n")
    # Postfix's smtpd line for the message names the original client, not vipd (127.0.0.1).
    line = wait_for(lambda: (m := re.search(rf"postfix/smtpd\[\d+\]: (\w+): client=\S*\[{re.escape(CLIENT)}\]",
                                            maillog.read_text(errors="replace") if maillog.exists() else ""))
                    and m, timeout=30, what="Postfix's log line")
    queue_id = line.group(1)
    assert wait_for(lambda: sink.messages(), timeout=30, what="delivery behind Postfix")
    # One grep follows the message: vipd logs Postfix's queue id beside its own.
    wait_for(lambda: f":{queue_id}" in vipd.log(), what="vipd's log to name Postfix's queue id")


def test_postfix_records_the_client_vipd_forwards_with_xforward(lab: Lab, postfix) -> None:
    peer, endpoint, sink, maillog = postfix
    server = type("S", (), {"address": f"127.0.0.1:{endpoint.port}"})()
    vipd = lab.vipd(pool_config(server, extra_pool='identity = "xforward"'))
    with smtplib.SMTP("127.0.0.1", vipd.port(), local_hostname="client.test", timeout=30,
                      source_address=(CLIENT, 0)) as s:
        s.sendmail("a@example.org", ["b@example.com"], b"Subject: xforward\r\n\r\nhello\r\n")
    assert wait_for(lambda: sink.messages(), timeout=30, what="delivery behind Postfix")
    # XFORWARD leaves the connection's own client in Postfix's log and names the original beside it.
    wait_for(lambda: maillog.exists() and re.search(
        rf"postfix/smtpd\[\d+\]: \w+: client=\S*\[127\.0\.0\.1\], orig_client=\S*\[{re.escape(CLIENT)}\]",
        maillog.read_text(errors="replace")), timeout=30, what="Postfix's log line")
