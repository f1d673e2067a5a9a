"""The three switched designs end to end: every layer a pool of real backends behind its own VIP of one
real vipd, a sink as the internal gateway and one as the outbound next hop. Each test runs with the
project's Python backends, and with real sendmail for the incoming and delivery layers (content
security stays the Python scanner: it is the part that scans)."""

from __future__ import annotations

import os
import re
import smtplib
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from email.policy import SMTP

import pytest

from backends.clamd_daemon import FOUND_NAME
from backends.scanner import EICAR
from clamd_lab import run_clamd
from spamd_lab import GTUBE, run_spamd
from support import Lab, Sink, Vipd, wait_for
from vipd.lab_scenarios import LISTED_CLIENT, Backend, free_ports, start_dns, start_layers
from vipd.topology import Topology as Design
from vipd.topology import load_scenario, scenario_names, vipd_config

INTERNAL_DOMAIN = "example.com"
OUTSIDE = "127.0.0.50"          # an Internet client
INSIDE = "127.0.0.60"           # an internal host (submits to the content VIP)


@dataclass
class Topology:
    scenario: str
    kind: str
    design: Design
    vipd: Vipd
    vip_ports: dict[str, int]
    gateway: Sink
    outbound: Sink
    backends: dict[str, list[Backend]]
    tmp: Path

    def backend_logs(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.tmp.glob("*-[0-9].log"))


@pytest.fixture(scope="session")
def clamd(tmp_path_factory):
    yield from run_clamd(tmp_path_factory)


@pytest.fixture(scope="session")
def spamd(tmp_path_factory):
    yield from run_spamd(tmp_path_factory)


def bring_up(lab: Lab, request, scenario: str, kind: str = "python", scanner: str | None = None) -> Topology:
    """What `vipd lab SCENARIO` runs (its own start_layers and DNS server), with vipd as a process."""
    design = load_scenario(scenario)
    assert design.internal_domain == INTERNAL_DOMAIN
    if scanner is not None:
        design = design.with_scanner(scanner)
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
    clamd = None
    if any(layer.scanner and "clamd" in layer.scanner for layer in design.layers):
        clamd = request.getfixturevalue("clamd").daemon.address
    spamd = request.getfixturevalue("spamd").address if any(layer.spam for layer in design.layers) else None
    dns_proc, nameserver = start_dns(design, lab.tmp)
    lab.procs.append(Backend("dns", nameserver, popen=dns_proc))
    names = design.names
    vip_ports = dict(zip(names, free_ports(len(names)), strict=True))
    vips = {name: f"127.0.0.1:{port}" for name, port in vip_ports.items()}
    gateway, outbound = lab.sink("gateway"), lab.sink("outbound")
    layers = start_layers(design, lab.tmp, vips, {"gateway": gateway.address, "outbound": outbound.address},
                          kind=kind, clamd=clamd, spamd=spamd)
    for group in layers.values():
        lab.procs.extend(group)
    text = vipd_config(design, vips, {name: [b.address for b in group] for name, group in layers.items()},
                       nameserver=nameserver, admin="127.0.0.1:0")
    vipd = lab.vipd(text, vips=tuple(names))
    return Topology(scenario, kind, design, vipd, vip_ports, gateway, outbound, layers, lab.tmp)


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


SCENARIO_KINDS = [(s, k) for k in ("python", "sendmail") for s in scenario_names()]


@pytest.fixture(params=SCENARIO_KINDS, ids=lambda p: f"{p[0]}-{p[1]}")
def topology(request, lab: Lab) -> Topology:
    return bring_up(lab, request, *request.param)


@pytest.fixture(params=SCENARIO_KINDS, ids=lambda p: f"{p[0]}-{p[1]}-clamd")
def clamd_topology(request, lab: Lab) -> Topology:
    """Every content layer scans with real clamd alone (the built-in scanner off)."""
    return bring_up(lab, request, *request.param, scanner="clamd")


def test_inbound_mail_crosses_every_layer_to_the_gateway(topology: Topology) -> None:
    code, _ = send(topology.vip_ports["mx"], OUTSIDE, "someone@outside.test", f"user@{INTERNAL_DOMAIN}",
                   message("inbound"))
    assert code == 250
    stored = wait_for(lambda: topology.gateway.messages(), what="the message at the gateway")[0]
    head = stored.body.split(b"\r\n\r\n", 1)[0].decode()
    hops = re.findall(r"by (\S+) \(", head)
    # Each VIP and each backend of each layer left its Received: line, innermost first.
    layers = topology.design.names
    vips = [f"{name}.dmz.vipd.test" for name in layers]
    assert [h for h in hops if h in vips] == list(reversed(vips)), head
    assert len(hops) == 2 * len(layers), head
    assert "\r\nX-Spam-Flag: NO\r\n" in head, head


def test_spam_is_scored_by_spamd_and_tagged_on_its_way_in(topology: Topology) -> None:
    code, _ = send(topology.vip_ports["mx"], OUTSIDE, "someone@outside.test", f"user@{INTERNAL_DOMAIN}",
                   message("offer", body=GTUBE.decode()))
    assert code == 250
    stored = wait_for(lambda: topology.gateway.messages(), what="the message at the gateway")[0]
    head = stored.body.split(b"\r\n\r\n", 1)[0].decode()
    assert "\r\nX-Spam-Flag: YES\r\n" in head and re.search(r"X-Spam-Status: Yes, score=1000\.\d .*GTUBE", head), head
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
    # Both verdicts are in the content layer's log (after the client's 250, with sendmail in front)...
    wait_for(lambda: len(re.findall(r"^infected from=<someone@outside.test>", topology.backend_logs(), re.M)) >= 2,
             what="the content layer's two verdicts")
    stored = wait_for(lambda: topology.gateway.messages(), what="the clean message")
    # ...and only the clean message reached the gateway.
    assert [m.body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in stored] == [b"clean"]


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


def test_eicar_is_stopped_by_real_clamd_at_the_content_layer(clamd_topology: Topology) -> None:
    topology = clamd_topology
    port = topology.vip_ports["mx"]
    for data in (message("plain", body=EICAR.decode()), message("attached", attachment=EICAR)):
        code, text = send(port, OUTSIDE, "someone@outside.test", f"user@{INTERNAL_DOMAIN}", data)
        if topology.kind == "python":
            assert (code, text[:5]) == (554, b"5.7.1") and FOUND_NAME.encode() in text, text
        else:
            assert code == 250
    assert send(port, OUTSIDE, "someone@outside.test", f"user@{INTERNAL_DOMAIN}", message("clean"))[0] == 250
    stored = wait_for(lambda: topology.gateway.messages(), what="the clean message")
    # clamd, not the built-in scanner (which is off), named both: its signature's name is in the log.
    wait_for(lambda: topology.backend_logs().count(f'detail="{FOUND_NAME}"') >= 2, what="clamd's two verdicts")
    assert [b"Subject: clean" in m.body for m in stored] == [True]


def test_a_client_on_the_dnsbl_is_refused_at_the_mx(topology: Topology) -> None:
    """The lab's own DNS server lists RFC 5782's test point; the incoming VIP asks it."""
    with smtplib.SMTP(local_hostname="client.outside.test", timeout=60, source_address=(LISTED_CLIENT, 0)) as s:
        code, text = s.connect("127.0.0.1", topology.vip_ports["mx"])
        if code == 220:
            s.ehlo()
            code, text = s.mail("someone@outside.test")
    assert code == 554 and text.startswith(b"5.7.1") and topology.design.dnsbl_zone.encode() in text, text
    # A client the list does not name is served on the same VIP.
    assert send(topology.vip_ports["mx"], OUTSIDE, "someone@outside.test", f"user@{INTERNAL_DOMAIN}",
                message("unlisted"))[0] == 250
    wait_for(lambda: topology.gateway.messages(), what="the unlisted client's message")


def test_killing_a_server_of_each_pool_loses_no_acknowledged_message(topology: Topology) -> None:
    """SIGKILL one server of every pool mid-run. A Python backend relays in-line (nothing to lose);
    a sendmail keeps what it acknowledged in its queue, so it is started again on the same queue,
    as an operator would after a crash, and must deliver that."""
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
    killed = [group[0] for group in topology.backends.values()]
    try:
        wait_for(lambda: len(acked) >= 10, timeout=60, what="some mail")
        for backend in killed:
            backend.kill()                       # one server of every pool, mid-run
        count = len(acked)
        wait_for(lambda: len(acked) >= count + 20, timeout=90, what="mail after the kills")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    restarted = [backend for backend in killed if backend.sendmail is not None]
    before = len(topology.gateway.messages())
    for backend in restarted:
        backend.restart()
    got = wait_for(lambda: (s := {m.body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                                  for m in topology.gateway.messages()}) >= set(acked) and s,
                   timeout=90, what="every acknowledged message at the gateway")
    assert set(acked) <= got
    print(f"{topology.scenario}-{topology.kind}: {len(acked)} acknowledged, all delivered; "
          f"{len(got) - before if restarted else 0} arrived after {len(restarted)} sendmail restart(s)")
