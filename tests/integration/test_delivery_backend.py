"""The delivery backend routes by mailertable: internal domains to the internal gateway, the rest out."""

from __future__ import annotations

import re
import smtplib

from support import PYTHON, Lab, proc_check, start, wait_for


def test_mailertable_routing_one_hop_per_transaction(lab: Lab) -> None:
    internal, outbound = lab.sink("internal"), lab.sink("outbound")
    table = lab.tmp / "mailertable"
    table.write_text("example.com  gateway\n.example.com gateway\n.  out\n")
    proc = start("delivery", [PYTHON, "-m", "backends.delivery", "--listen", "127.0.0.1:0", "--mailertable",
                              str(table), "--hop", f"gateway={internal.address}", "--hop",
                              f"out={outbound.address}"], lab.tmp / "delivery.log")
    lab.procs.append(proc)
    port = int(wait_for(lambda: proc_check(proc) and re.search(r"listening on [\d.]+:(\d+)", proc.text()),
                        what="listen").group(1))
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        # smtplib sends to the recipients it can in one transaction; the 452 one it reports refused.
        refused = s.sendmail("a@example.org", ["u@example.com", "v@mail.example.com", "w@elsewhere.example"],
                             b"Subject: mixed\r\n\r\nhello\r\n")
        assert list(refused) == ["w@elsewhere.example"] and refused["w@elsewhere.example"][0] == 452
        s.sendmail("a@example.org", ["w@elsewhere.example"], b"Subject: out\r\n\r\nhello\r\n")
    inside = wait_for(lambda: internal.messages())
    outside = wait_for(lambda: outbound.messages())
    assert [m.envelope["rcpt_to"] for m in inside] == [["u@example.com", "v@mail.example.com"]]
    assert [m.envelope["rcpt_to"] for m in outside] == [["w@elsewhere.example"]]
