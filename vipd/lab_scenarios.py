"""``vipd lab SCENARIO``: one of the email DMZ's switched designs (conf/SCENARIO/topology.toml) on
loopback.

Starts what the design needs around it: a sink as the internal gateway and one as the outbound next
hop, its own DNS server holding the DNSBL zone, a private clamd when a content layer scans with one
and a private spamd when one scores spam; then the backends of every layer (the project's Python
backends, or real sendmail for the incoming and delivery layers), and one vipd with a VIP per layer.
Prints the entry points (the Internet-facing VIP first) and how to send; runs until Ctrl-C (or, with
``--once``, sends samples and stops); stops every process it started, also on error. Mail for the
internal domain is accepted from any sender, without outside DNS. ``start_layers`` is shared with
the end-to-end tests, so they run what the lab runs.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from backends.child_daemon import die_with_parent

from .config import ConfigError
from .topology import Topology, backend_command, load_scenario, render, scenario_names, vipd_config

__all__ = ["Backend", "free_ports", "run_scenario_lab", "spawn", "start_layers", "stop_all"]

ROOT = Path(__file__).resolve().parent.parent
LISTED_CLIENT = "127.0.0.2"      # RFC 5782's test point, which the lab's DNSBL lists


def free_ports(n: int) -> list[int]:
    """``n`` different free ports: all held open at once, so the kernel cannot hand out one twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def spawn(workdir: Path, name: str, cmd: list[str], timeout_seconds: float = 20.0) -> tuple[subprocess.Popen, str]:
    """Start a helper process that listens on port 0 and says where; its process and that address."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT, preexec_fn=die_with_parent)
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        match = re.search(r"listening on ([\d.]+:\d+)", log_path.read_text(errors="replace"))
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{name} did not start:\n{log_path.read_text(errors='replace')[-2000:]}")


@dataclass
class Backend:
    """One server of a layer's pool: a Python backend process or a sendmail instance."""

    name: str
    address: str
    popen: subprocess.Popen | None = None
    sendmail: Any = None            # backends.sendmail.SendmailInstance

    @property
    def pid(self) -> int | None:
        """The PID to signal for this server (sendmail's daemon as this machine sees it)."""
        if self.sendmail is not None:
            return self.sendmail.daemon_pid
        return self.popen.pid if self.popen is not None else None

    def kill(self) -> None:
        """SIGKILL, as a crash: a sendmail's queue stays on disk until it runs again."""
        if self.sendmail is not None:
            self.sendmail.kill()
        elif self.popen is not None:
            self.popen.kill()
            self.popen.wait()

    def restart(self) -> None:
        """Start a killed sendmail again on its port and queue (a Python backend keeps nothing)."""
        assert self.sendmail is not None, "only a sendmail has a queue to come back to"
        self.sendmail.stop()
        self.sendmail.start()

    def stop(self) -> None:
        if self.sendmail is not None:
            self.sendmail.stop()
        elif self.popen is not None:
            stop_all([self.popen])


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Names the lab's sendmails must resolve without DNS (senders' domains, our own).
_SENDMAIL_HOSTS = {"outside.test": "127.0.0.1", "elsewhere.example": "127.0.0.1"}


def start_layers(topo: Topology, workdir: Path, vips: dict[str, str], sinks: dict[str, str], *,
                 kind: str = "python", clamd: str | None = None, spamd: str | None = None
                 ) -> dict[str, list[Backend]]:
    """Every layer's servers, on free ports; with ``kind="sendmail"`` the incoming and delivery
    layers are real sendmail (content security stays the Python backend: it is the part that scans).
    Stops what it started when one fails to start."""
    started: dict[str, list[Backend]] = {}
    try:
        for layer in topo.layers:
            for i in range(len(layer.servers)):
                name = f"{layer.name}-{i + 1}"
                if kind == "sendmail" and layer.role in ("incoming", "delivery"):
                    instance = start_sendmail(topo, workdir, layer.name, i, vips, sinks)
                    backend = Backend(name, instance.address, sendmail=instance)
                else:
                    cmd = backend_command(topo, layer.name, i, "127.0.0.1:0", vips, sinks, clamd, spamd=spamd)
                    proc, address = spawn(workdir, name, cmd)
                    backend = Backend(name, address, popen=proc)
                started.setdefault(layer.name, []).append(backend)
    except BaseException:
        for backends in started.values():
            for backend in backends:
                backend.stop()
        raise
    return started


def start_sendmail(topo: Topology, workdir: Path, layer_name: str, index: int, vips: dict[str, str],
                   sinks: dict[str, str]):
    """A real sendmail for an incoming layer (smart host: the next VIP) or a delivery layer
    (mailertable: the internal domain to the gateway; smart host: the outbound next hop)."""
    from backends.sendmail import SendmailInstance, free_port
    role = topo.layer(layer_name).role
    if role == "incoming":
        following = topo.following(layer_name)
        assert following is not None
        settings = {"smart_host": vips[following], "relay_domains": [topo.internal_domain]}
    else:
        settings = {"mailertable": {topo.internal_domain: sinks["gateway"]}, "smart_host": sinks["outbound"]}
    hosts = {**_SENDMAIL_HOSTS, topo.internal_domain: "127.0.0.1"}
    instance = SendmailInstance(workdir / f"{layer_name}-{index + 1}", role, free_port(),
                                hostname=f"{layer_name}-{index + 1}.dmz.vipd.test", hosts=hosts, **settings)
    instance.start()
    return instance


def start_dns(topo: Topology, workdir: Path) -> tuple[subprocess.Popen, str]:
    """The lab's own DNS server on a free port, holding the DNSBL zone."""
    cmd = [sys.executable, "-m", "vipd.labdns", "--listen", "127.0.0.1:0", "--zone", topo.dnsbl_zone]
    for address in topo.dnsbl_listed:
        cmd += ["--listed", address]
    return spawn(workdir, "dns", cmd)


def start_clamd(topo: Topology, workdir: Path) -> tuple[Topology, Any]:
    """A private clamd when a content layer scans with one; without clamd here, those layers scan
    with the built-in scanner (said on the terminal) rather than not at all."""
    if not any(layer.scanner and "clamd" in layer.scanner for layer in topo.layers):
        return topo, None
    from backends.clamd_daemon import ClamdDaemon, ClamdUnavailable
    daemon = ClamdDaemon(workdir / "clamd")
    try:
        return topo, daemon.start()
    except ClamdUnavailable as exc:
        print(f"lab: {exc}; the clamd layers scan with the built-in scanner instead", flush=True)
        layers = tuple(replace(layer, scanner="builtin") if layer.scanner and "clamd" in layer.scanner else layer
                       for layer in topo.layers)
        return replace(topo, layers=layers), None


def start_spamd(topo: Topology, workdir: Path) -> tuple[Topology, Any]:
    """A private spamd when a content layer scores spam with one; without spamd here, mail is not
    scored (said on the terminal): scoring is a filter's hint, not a barrier (docs/layers.md)."""
    if not any(layer.spam for layer in topo.layers):
        return topo, None
    from backends.spamd_daemon import SpamdDaemon, SpamdUnavailable
    daemon = SpamdDaemon(workdir / "spamd")
    try:
        return topo, daemon.start()
    except SpamdUnavailable as exc:
        print(f"lab: {exc}; mail is not scored for spam", flush=True)
        return topo.without_spam(), None


def run_scenario_lab(scenario: str, workdir: Path | None = None, once: bool = False,
                     backends: str = "python", write_config: bool = False) -> int:
    from . import config as config_mod
    from .net.daemon import Daemon

    if scenario not in scenario_names():
        print(f"lab: unknown scenario {scenario!r}; known: {', '.join(scenario_names())}", file=sys.stderr)
        return 2
    try:
        topo = load_scenario(scenario)
    except ConfigError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 2
    if write_config:
        target = topo.file.parent / "vipd.toml"
        target.write_text(render(topo))
        print(f"lab: wrote {target}")
        return 0
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"vipd-lab-{scenario}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if backends == "sendmail":
        os.chmod(workdir, 0o755)     # sendmail's children run as "mail" and must reach their queues
    procs: list[subprocess.Popen] = []
    layers: dict[str, list[Backend]] = {}
    clamd = spamd = None
    try:
        sinks = {}
        for name in ("gateway", "outbound"):
            proc, sinks[name] = spawn(workdir, name, [sys.executable, "-m", "backends.sink", "--listen",
                                                      "127.0.0.1:0", "--store", str(workdir / name), "--name", name])
            procs.append(proc)
        proc, nameserver = start_dns(topo, workdir)
        procs.append(proc)
        topo, clamd = start_clamd(topo, workdir)
        topo, spamd = start_spamd(topo, workdir)
        vips = {layer.name: f"127.0.0.1:{port}" for layer, port in zip(topo.layers, free_ports(len(topo.layers)),
                                                                          strict=True)}
        layers = start_layers(topo, workdir, vips, {**sinks}, kind=backends,
                              clamd=clamd.address if clamd else None, spamd=spamd.address if spamd else None)
        cfg_path = workdir / "vipd.toml"
        servers = {name: [b.address for b in group] for name, group in layers.items()}
        cfg_path.write_text(vipd_config(topo, vips, servers,
                                        nameserver=nameserver, admin="127.0.0.1:0", spool_dir=workdir / "spool",
                                        top=f"# Written by `vipd lab {scenario}` from {topo.file}.\n"))
        cfg = config_mod.load(cfg_path)

        async def main() -> None:
            daemon = Daemon(cfg)
            task = asyncio.ensure_future(daemon.run())
            while "admin" not in daemon.bound and not task.done():
                await asyncio.sleep(0.02)
            if task.done():
                await task
                return
            # A lab lives in a terminal: SIGHUP means the terminal went away, not "reload".
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, daemon.request_stop)
            _explain(topo, workdir, vips, sinks, nameserver, clamd, spamd,
                     daemon.bound.get("admin", [("", 0)])[0][1], layers)
            if once:
                await asyncio.to_thread(_samples, topo, vips["mx"], workdir)
                daemon.request_stop()
            await task

        asyncio.run(main())
    finally:
        count = sum(len(group) for group in layers.values())
        sendmails = sum(backend.sendmail is not None for group in layers.values() for backend in group)
        for group in layers.values():
            for backend in group:
                try:
                    backend.stop()
                except Exception as exc:  # noqa: BLE001 - the others must still be stopped
                    print(f"lab: stopping {backend.name} failed: {exc}", file=sys.stderr)
        helpers = ["the DNS server"]
        for name, daemon in (("clamd", clamd), ("spamd", spamd)):
            if daemon is not None:
                daemon.stop()
                helpers.append(name)
        stop_all(procs)
        print(f"lab: stopped vipd, {count} backends" + (f" ({sendmails} sendmail)" if sendmails else "")
              + f", 2 sinks, {', '.join(helpers[:-1]) + ' and ' if len(helpers) > 1 else ''}{helpers[-1]}"
              + f"; files kept in {workdir}", flush=True)
    return 0


def _samples(topo: Topology, mx: str, workdir: Path) -> None:
    """--once: a message through every layer, and a client the DNSBL lists."""
    host, port = mx.rsplit(":", 1)
    data = (f"From: someone@outside.test\r\nTo: postmaster@{topo.internal_domain}\r\n"
            "Subject: through the DMZ\r\n\r\nIncoming, content security, delivery.\r\n")
    with smtplib.SMTP(host, int(port), local_hostname="client.outside.test", timeout=60) as s:
        s.sendmail("someone@outside.test", [f"postmaster@{topo.internal_domain}"], data)
    landed = _wait_landed(workdir / "gateway")
    print(f"lab: sample through every layer: 250; at the gateway: {landed or 'nothing yet'}", flush=True)
    with smtplib.SMTP(host, int(port), local_hostname="client.outside.test", timeout=60,
                      source_address=(LISTED_CLIENT, 0)) as s:
        s.ehlo()
        code, text = s.mail("someone@outside.test")
    print(f"lab: a client on the DNSBL ({LISTED_CLIENT}) got: {code} {text.decode(errors='replace')}", flush=True)


def _wait_landed(folder: Path) -> str | None:
    for _ in range(300):
        found = sorted(folder.glob("*.eml")) if folder.exists() else []
        if found:
            return str(found[0])
        time.sleep(0.02)
    return None


def _explain(topo: Topology, workdir: Path, vips: dict[str, str], sinks: dict[str, str], nameserver: str,
             clamd: Any, spamd: Any, admin: int, layers: dict[str, list[Backend]]) -> None:
    print(f"\nlab {topo.name}: {topo.description}   (from {topo.file})")
    print(f"  Internet-facing VIP (mx): {vips['mx']}")
    first_content = next(layer.name for layer in topo.layers if layer.scans)
    for layer in topo.layers[1:]:
        scan = (f", scanner {layer.scanner}" if layer.scanner else "") + (
            f", spam {layer.spam} ({layer.spam_action})" if layer.spam else "")
        print(f"  {layer.name} VIP: {vips[layer.name]}   ({layer.role}{scan}"
              + ("; internal hosts submit here)" if layer.name == first_content else ")"))
    for name, group in layers.items():
        print(f"    {name} pool: " + ", ".join(f"{b.name} {b.address} (pid {b.pid}"
                                              + (", sendmail)" if b.sendmail is not None else ")") for b in group))
    print(f"  internal gateway sink: {sinks['gateway']} (files in {workdir / 'gateway'})")
    print(f"  outbound next hop sink: {sinks['outbound']} (files in {workdir / 'outbound'})")
    print(f"  DNS server: {nameserver} (DNSBL {topo.dnsbl_zone} lists {', '.join(topo.dnsbl_listed)})"
          + (f"; clamd: {clamd.address}" if clamd is not None else "")
          + (f"; spamd: {spamd.address}" if spamd is not None else ""))
    print(f"  status page: http://127.0.0.1:{admin}/   vipctl --admin http://127.0.0.1:{admin} show")
    host, port = vips["mx"].rsplit(":", 1)
    print(f"Send: swaks --server {host}:{port} --from you@outside.test --to user@{topo.internal_domain}")
    print(f"      (from a listed client: add --local-interface {LISTED_CLIENT}; an EICAR test: --attach FILE)")
    if spamd is not None:
        print("      (a spam test: --body with SpamAssassin's GTUBE string; it arrives with X-Spam-Flag: YES)")
    print("Ctrl-C stops the lab.", flush=True)
