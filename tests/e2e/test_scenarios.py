"""The three switched designs end to end: every layer a pool of real backends behind its own VIP of one
real vipd, a sink as the internal gateway and one as the outbound next hop. Each test runs with the
project's Python backends, and with real sendmail for the incoming and delivery layers (content
security stays the Python scanner: it is the part that scans)."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from email.policy import SMTP

import pytest

from backends.scanner import EICAR
from support import Lab, Sink, Vipd, proc_check, start, wait_for
from vipd.lab_scenarios import free_ports, start_sendmail_backend
from vipd.topology import INTERNAL_DOMAIN, SCENARIOS, backend_command, vipd_config, write_maps

OUTSIDE = "127.0.0.50"          # an Internet client
INSIDE = "127.0.0.60"           # an internal host (submits to the content VIP)






@dataclass
class Topology:
    scenario: str
    kind: str
    vipd: Vipd
    vip_ports: dict[str, int]
    gateway: Sink
    outbound: Sink
    backends: dict[str, list]


def bring_up(lab: Lab, scenario: str, kind: str = "python") -> Topology:
    layers = SCENARIOS[scenario]
    if kind == "sendmail":
        from backends.sendmail import missing
        if missing():
            if os.environ.get("CI"):
                pytest.fail(f"sendmail cannot run here (missing: {missing()})")
            pytest.skip(f"sendmail cannot run here (missing: {missing()})")
        os.chmod(lab.tmp, 0o755)        # sendmail's children run as "mail"
        for parent in lab.tmp.parents:
            if parent == Path("/tmp") or parent == Path("/"):
                break
            os.chmod(parent, parent.stat().st_mode | 0o005)
    vip_ports = dict(zip((layer.name for layer in layers), free_ports(len(layers)), strict=True))
    gateway, outbound = lab.sink("gateway"), lab.sink("outbound")
    maps = write_maps(lab.tmp / "maps")
    sinks = {"gateway": gateway.address, "outbound": outbound.address}
    ports: dict[str, list[int]] = {}
    procs: dict[str, list] = {}
    for layer in layers:
        for i in range(layer.servers):
            if kind == "sendmail" and layer.role in ("incoming", "delivery"):
                instance = start_sendmail_backend(lab.tmp, scenario, layer.name, i, vip_ports, sinks)
                lab.procs.append(_Stopper(instance))
                ports.setdefault(layer.name, []).append(instance.port)
                procs.setdefault(layer.name, []).append(instance)
                continue
            cmd = backend_command(scenario, layer.name, i, 0, vip_ports, sinks, maps)
            proc = start(f"{layer.name}{i + 1}", cmd, lab.tmp / f"{layer.name}{i + 1}.log")
            lab.procs.append(proc)
            match = wait_for(lambda: proc_check(proc) and re.search(r"listening on [\d.]+:(\d+)", proc.text()),
                             what=f"{layer.name}{i + 1}")
            ports.setdefault(layer.name, []).append(int(match.group(1)))
            procs.setdefault(layer.name, []).append(proc)
    text = vipd_config(scenario, vip_ports, ports, maps=maps)
    vipd = lab.vipd(text, vips=tuple(layer.name for layer in layers))
    return Topology(scenario, kind, vipd, vip_ports, gateway, outbound, procs)


class _Stopper:
    """Lets Lab.close() stop a sendmail instance like its other processes."""

    def __init__(self, instance) -> None:
        self.instance = instance

    def stop(self) -> None:
        self.instance.stop()


def client(port: int, source: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.outside.test", timeout=60,
                        source_address=(source, 0))


def message(subject: str, attachment: bytes | None = None, body: str | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "someone@outside.test", f"user@{INTERNAL_DOMAIN}", subject
    msg.set_content(f"{body or subject}\n")
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="file.com")
    return msg.as_bytes(policy=SMTP)


def send(port: int, source: str, sender: str, rcpt: str, data: bytes) -> tuple[int, bytes]:
    with client(port, source) as s:
        s.ehlo()
        code, text = s.mail(sender)
        if code != 250:
            return code, text
        code, text = s.rcpt(rcpt)
        if code != 250:
            return code, text
        return s.data(data)


@pytest.fixture(params=[(s, k) for k in ("python", "sendmail") for s in sorted(SCENARIOS)],
                ids=lambda p: f"{p[0]}-{p[1]}")
def topology(request, lab: Lab) -> Topology:
    return bring_up(lab, *request.param)


def test_inbound_mail_crosses_every_layer_to_the_gateway(topology: Topology) -> None:
    code, _ = send(topology.vip_ports["mx"], OUTSIDE, "someone@outside.test", f"user@{INTERNAL_DOMAIN}",
                   message("inbound"))
    assert code == 250
    stored = wait_for(lambda: topology.gateway.messages(), what="the message at the gateway")[0]
    head = stored.body.split(b"\r\n\r\n", 1)[0].decode()
    hops = re.findall(r"by (\S+) \(", head)
    # Each VIP and each backend of each layer left its Received: line, innermost first.
    layers = [layer.name for layer in SCENARIOS[topology.scenario]]
    vips = [f"{name}.dmz.vipd.test" for name in layers]
    assert [h for h in hops if h in vips] == list(reversed(vips)), head
    assert len(hops) == 2 * len(layers), head
    assert f"[{OUTSIDE}]" in head                       # the first hop recorded the real client
    assert topology.outbound.messages() == []


def test_eicar_is_stopped_at_the_content_layer_clean_mail_passes(topology: Topology) -> None:
    port = topology.vip_ports["mx"]
    for data in (message("plain", body=EICAR.decode()), message("attached", attachment=EICAR)):
        code, text = send(port, OUTSIDE, "someone@outside.test", f"user@{INTERNAL_DOMAIN}", data)
        if topology.kind == "python":
            assert (code, text[:5]) == (554, b"5.7.1"), text      # in-line: the client hears the verdict
        else:
            assert code == 250       # a sendmail incoming layer queues first; content security stops it later
    assert send(port, OUTSIDE, "someone@outside.test", f"user@{INTERNAL_DOMAIN}", message("clean"))[0] == 250
    stored = wait_for(lambda: topology.gateway.messages(), what="the clean message")
    assert len(stored) == 1 and b"Subject: clean" in stored[0].body


def test_relaying_through_the_mx_is_refused(topology: Topology) -> None:
    with client(topology.vip_ports["mx"], OUTSIDE) as s:
        s.ehlo()
        s.mail("someone@outside.test")
        code, text = s.rcpt("victim@elsewhere.example")
    assert (code, text[:5]) == (550, b"5.7.1")
    code, _ = send(topology.vip_ports["mx"], OUTSIDE, "spammer@bad.example", f"user@{INTERNAL_DOMAIN}",
                   message("spam"))
    assert code == 550                                   # the access map


def test_outbound_mail_from_an_internal_host_is_scanned_and_leaves(topology: Topology) -> None:
    port = topology.vip_ports["content"]                  # internal hosts submit to content security
    data = message("outbound").replace(f"To: user@{INTERNAL_DOMAIN}".encode(), b"To: friend@elsewhere.example")
    assert send(port, INSIDE, f"staff@{INTERNAL_DOMAIN}", "friend@elsewhere.example", data)[0] == 250
    out = wait_for(lambda: topology.outbound.messages(), what="the message at the outbound hop")
    assert out[0].envelope["rcpt_to"] == ["friend@elsewhere.example"]
    infected = message("bad", body=EICAR.decode())
    assert send(port, INSIDE, f"staff@{INTERNAL_DOMAIN}", "friend@elsewhere.example", infected)[0] == 554
    assert topology.gateway.messages() == []


def test_killing_a_server_of_each_pool_loses_no_acknowledged_message(topology: Topology) -> None:
    if topology.kind == "sendmail":
        pytest.skip("a killed sendmail keeps what it queued until it runs again: see the Python runs")
    acked: list[str] = []
    stop = threading.Event()

    def sender(index: int) -> None:
        n = 0
        while not stop.is_set():
            tag = f"k{index}-{n}"
            code, _ = send(topology.vip_ports["mx"], OUTSIDE, "someone@outside.test", f"user@{INTERNAL_DOMAIN}",
                           message(tag))
            if code == 250:
                acked.append(tag)
            n += 1

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acked) >= 10, timeout=60, what="some mail")
        for procs in topology.backends.values():
            procs[0].popen.send_signal(signal.SIGKILL)   # one server of every pool, mid-run
        count = len(acked)
        wait_for(lambda: len(acked) >= count + 20, timeout=90, what="mail after the kills")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    got = wait_for(lambda: (s := {m.body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                                  for m in topology.gateway.messages()}) >= set(acked) and s,
                   timeout=60, what="every acknowledged message at the gateway")
    assert set(acked) <= got
