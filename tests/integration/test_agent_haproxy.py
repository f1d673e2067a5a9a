"""A real HAProxy (Debian's package) in TCP mode obeys ``python -m health.agent``: weight, drain, down, ready.

Two sinks behind HAProxy, one load agent per sink reading its own load file. The test changes sink
a's load file and checks both what HAProxy's stats socket reports and where SMTP messages sent through
HAProxy land. Skips when haproxy is missing, unless CI is set: there a missing haproxy fails.
"""

from __future__ import annotations

import csv
import io
import os
import re
import smtplib
import socket
from pathlib import Path


from haproxy_lab import start_haproxy
from support import PYTHON, Sink, proc_check, start, wait_for

QUEUE_LOAD = 8.0
REFUSE_LOAD = 12.0
# Different loads for a and b, so each weight can only have come from that server's own agent:
# 100 - ceil(99 * 2 / 8) = 75 and 100 - ceil(99 * 4 / 8) = 50.
LOW_A, WEIGHT_A = 2.0, 75
LOW_B, WEIGHT_B = 4.0, 50

# srv_op_state and srv_admin_state in "show servers state" (HAProxy's enum srv_state and SRV_ADMF_*).
OP_STOPPED, OP_RUNNING = 0, 2
ADMF_FDRAIN = 0x08


def write_load(path: Path, load: float) -> None:
    # Replaced in one rename so the agent never reads a half-written file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{load:.2f} 0.00 0.00 1/100 4242\n")
    os.replace(tmp, path)


def start_agent(lab, name: str, load_file: Path) -> int:
    proc = start(f"agent-{name}", [PYTHON, "-m", "health.agent", "--listen", "127.0.0.1:0",
                                   "--loadavg-file", str(load_file), "--queue-load", str(QUEUE_LOAD),
                                   "--refuse-load", str(REFUSE_LOAD)], lab.tmp / f"agent-{name}.log")
    lab.procs.append(proc)
    match = wait_for(lambda: proc_check(proc) and re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.text()),
                     what=f"agent {name} to listen")
    return int(match.group(1))


class HAProxy:
    """HAProxy in the foreground before sinks a and b; its admin socket for reading server state."""

    def __init__(self, lab, sinks: dict[str, Sink], agent_ports: dict[str, int]) -> None:
        self.stats = lab.tmp / "haproxy.sock"
        servers = "\n".join(
            f"    server {name} 127.0.0.1:{sink.port} weight 100 check inter 200ms"
            f" agent-check agent-port {agent_ports[name]} agent-inter 200ms"
            for name, sink in sinks.items())
        self.proc, self.port = start_haproxy(lab, f"""\
global
    stats socket {self.stats} mode 600 level admin
    nbthread 1

defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend smtp
    bind fd@{{fd}}
    default_backend sinks

backend sinks
    balance roundrobin
    option smtpchk
{servers}
""")
        wait_for(lambda: proc_check(self.proc) and self.stats.exists(), what="haproxy's stats socket")

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(line.encode() + b"\n")
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
        return out.decode()

    def servers_state(self) -> dict[str, dict[str, str]]:
        """``show servers state sinks`` by server name (first line: version, then a '# ' header)."""
        lines = [ln for ln in self.command("show servers state sinks").splitlines() if ln.strip()]
        header = next(ln for ln in lines if ln.startswith("# "))[2:].split()
        rows = [dict(zip(header, ln.split())) for ln in lines if not ln.startswith("#") and len(ln.split()) > 3]
        return {row["srv_name"]: row for row in rows}

    def stat(self) -> dict[str, dict[str, str]]:
        """``show stat`` rows of backend sinks by server name."""
        text = self.command("show stat").removeprefix("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == "sinks" and row["svname"] not in ("FRONTEND", "BACKEND")}

    def view(self, name: str) -> dict[str, str]:
        """What the test checks for one server, from both commands, in one dict (for assertion messages)."""
        state, stat = self.servers_state()[name], self.stat()[name]
        return {"status": stat["status"], "weight": stat["weight"], "last_agt": stat["last_agt"],
                "op_state": state["srv_op_state"], "admin_state": state["srv_admin_state"],
                "uweight": state["srv_uweight"], "iweight": state["srv_iweight"]}

    def wait_view(self, name: str, **expected) -> dict[str, str]:
        seen: dict[str, str] = {}

        def matches():
            proc_check(self.proc)
            seen.update(self.view(name))
            return all(seen[key] == str(value) for key, value in expected.items())

        try:
            wait_for(matches, interval=0.05, what=f"haproxy to show {name} with {expected}")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; last seen {seen}\n{self.proc.text()[-2000:]}") from None
        return dict(seen)


def send(port: int, tag: str, count: int) -> None:
    # One connection per message: HAProxy picks a server per TCP connection.
    for i in range(count):
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as smtp:
            smtp.sendmail("sender@example.test", ["rcpt@example.test"],
                          f"Subject: {tag}-{i}\r\nX-Phase: {tag}\r\n\r\nthrough haproxy\r\n")


def landed(sinks: dict[str, Sink], tag: str) -> dict[str, int]:
    return {name: sum(f"X-Phase: {tag}\r\n".encode() in m.body for m in sink.messages())
            for name, sink in sinks.items()}


def test_haproxy_follows_the_load_agent(lab):
    sinks = {"a": lab.sink("a"), "b": lab.sink("b")}
    load_files = {name: lab.tmp / f"{name}.loadavg" for name in sinks}
    write_load(load_files["a"], LOW_A)
    write_load(load_files["b"], LOW_B)
    agent_ports = {name: start_agent(lab, name, load_files[name]) for name in sinks}
    haproxy = HAProxy(lab, sinks, agent_ports)

    # Low load on both: UP, weight = the agent's percentage of the configured 100, both get mail.
    up_a = dict(status="UP", op_state=OP_RUNNING, admin_state=0, weight=WEIGHT_A, uweight=WEIGHT_A,
                iweight=100, last_agt="via agent : up")
    haproxy.wait_view("a", **up_a)
    haproxy.wait_view("b", status="UP", op_state=OP_RUNNING, admin_state=0, weight=WEIGHT_B, uweight=WEIGHT_B,
                      iweight=100, last_agt="via agent : up")
    send(haproxy.port, "low", 10)
    low = landed(sinks, "low")
    assert sum(low.values()) == 10
    assert low["a"] > 0 and low["b"] > 0, low

    # Between queue_load and refuse_load the agent says "drain": HAProxy sets the forced-drain admin
    # flag (the weight it shows is unchanged, but no new connection goes to a).
    write_load(load_files["a"], QUEUE_LOAD + 1)
    haproxy.wait_view("a", status="DRAIN (agent)", op_state=OP_RUNNING, admin_state=ADMF_FDRAIN)
    send(haproxy.port, "drain", 6)
    assert landed(sinks, "drain") == {"a": 0, "b": 6}

    # At refuse_load the agent says "down"; the drain flag stays, as drain is sticky in HAProxy.
    write_load(load_files["a"], REFUSE_LOAD + 1)
    haproxy.wait_view("a", status="DOWN (agent)", op_state=OP_STOPPED, admin_state=ADMF_FDRAIN,
                      last_agt="via agent : down")
    send(haproxy.port, "down", 4)
    assert landed(sinks, "down") == {"a": 0, "b": 4}

    # Low again: "ready up 75%" clears the drain flag (only "ready" does) and brings a back up.
    write_load(load_files["a"], LOW_A)
    haproxy.wait_view("a", **up_a)
    send(haproxy.port, "back", 10)
    back = landed(sinks, "back")
    assert sum(back.values()) == 10
    assert back["a"] > 0 and back["b"] > 0, back

    assert "sinks/a enters drain state" in haproxy.proc.text()
