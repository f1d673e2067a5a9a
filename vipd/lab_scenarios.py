"""``vipd lab SCENARIO``: one of the email DMZ's three designs on loopback, with Python backends.

Starts a sink as the internal gateway and one as the outbound next hop, two Python backends per layer
(vipd.topology says what each runs), and one vipd with a VIP per layer; prints the entry points (the
Internet-facing VIP first) and how to send; runs until Ctrl-C (or, with ``--once``, sends a sample and
stops); stops every process it started, also on error. Mail for ``example.com`` is accepted from
anyone, without outside DNS.
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
from pathlib import Path

from .topology import DESCRIPTIONS, INTERNAL_DOMAIN, SCENARIOS, backend_command, vipd_config, write_maps

__all__ = ["run_scenario_lab", "start_sendmail_backend"]

ROOT = Path(__file__).resolve().parent.parent


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




def _spawn(workdir: Path, name: str, cmd: list[str]) -> tuple[subprocess.Popen, int]:
    """Start a backend or sink on port 0; its process and the port it printed."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = re.search(r"listening on [\d.]+:(\d+)", log_path.read_text(errors="replace"))
        if match:
            return proc, int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{name} did not start:\n{log_path.read_text(errors='replace')[-2000:]}")


# Names the lab's sendmails must resolve without DNS (senders' domains, our own).
_SENDMAIL_HOSTS = {"outside.test": "127.0.0.1", INTERNAL_DOMAIN: "127.0.0.1", "elsewhere.example": "127.0.0.1"}


def start_sendmail_backend(workdir: Path, scenario: str, layer_name: str, index: int, vip_ports: dict[str, int],
                    sinks: dict[str, str]):
    """A real sendmail for an incoming or delivery layer (content security stays Python: it scans)."""
    from backends.sendmail import SendmailInstance, free_port
    names = [layer.name for layer in SCENARIOS[scenario]]
    role = next(layer.role for layer in SCENARIOS[scenario] if layer.name == layer_name)
    folder = workdir / f"{layer_name}{index + 1}"
    if role == "incoming":
        following = names[names.index(layer_name) + 1]
        settings = {"smart_host": f"127.0.0.1:{vip_ports[following]}", "relay_domains": [INTERNAL_DOMAIN]}
    else:
        settings = {"mailertable": {INTERNAL_DOMAIN: sinks["gateway"]}, "smart_host": sinks["outbound"]}
    instance = SendmailInstance(folder, role, free_port(), hostname=f"{layer_name}{index + 1}.dmz.vipd.test",
                                hosts=_SENDMAIL_HOSTS, **settings)
    instance.start()
    return instance


def run_scenario_lab(scenario: str, workdir: Path | None = None, once: bool = False,
                     backends: str = "python") -> int:
    from . import config as config_mod
    from .net.daemon import Daemon

    if scenario not in SCENARIOS:
        print(f"lab: unknown scenario {scenario!r}; known: {', '.join(sorted(SCENARIOS))}", file=sys.stderr)
        return 2
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"vipd-lab-{scenario}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if backends == "sendmail":
        os.chmod(workdir, 0o755)     # sendmail's children run as "mail" and must reach their queues
    procs: list[subprocess.Popen] = []
    sendmails: list = []
    try:
        layers = SCENARIOS[scenario]
        vip_ports = dict(zip((layer.name for layer in layers), free_ports(len(layers)), strict=True))
        sinks = {}
        for name in ("gateway", "outbound"):
            proc, port = _spawn(workdir, name, [sys.executable, "-m", "backends.sink", "--listen", "127.0.0.1:0",
                                                "--store", str(workdir / name), "--name", name])
            procs.append(proc)
            sinks[name] = f"127.0.0.1:{port}"
        maps = write_maps(workdir / "maps")
        ports: dict[str, list[int]] = {}
        for layer in layers:
            for i in range(layer.servers):
                if backends == "sendmail" and layer.role in ("incoming", "delivery"):
                    instance = start_sendmail_backend(workdir, scenario, layer.name, i, vip_ports, sinks)
                    sendmails.append(instance)
                    ports.setdefault(layer.name, []).append(instance.port)
                    continue
                proc, port = _spawn(workdir, f"{layer.name}{i + 1}",
                                    backend_command(scenario, layer.name, i, 0, vip_ports, sinks, maps))
                procs.append(proc)
                ports.setdefault(layer.name, []).append(port)
        cfg_path = workdir / "vipd.toml"
        cfg_path.write_text(f"# Written by `vipd lab {scenario}`: {DESCRIPTIONS[scenario]}.\n"
                            + vipd_config(scenario, vip_ports, ports, maps=maps, spool_dir=workdir / "spool"))
        cfg = config_mod.load(cfg_path)

        async def main() -> None:
            daemon = Daemon(cfg)
            task = asyncio.ensure_future(daemon.run())
            while "admin" not in daemon.bound and not task.done():
                await asyncio.sleep(0.02)
            if task.done():
                await task
                return
            _explain(scenario, workdir, vip_ports, sinks, daemon.bound.get("admin", [("", 0)])[0][1])
            if once:
                code = await asyncio.to_thread(_send_sample, vip_ports["mx"])
                landed = await asyncio.to_thread(_wait_landed, workdir / "gateway")
                print(f"lab: sample through every layer: {code}; at the gateway: {landed or 'nothing yet'}",
                      flush=True)
                daemon.request_stop()
            await task

        asyncio.run(main())
    finally:
        for instance in sendmails:
            try:
                instance.stop()
            except Exception as exc:  # noqa: BLE001 - the others must still be stopped
                print(f"lab: stopping a sendmail failed: {exc}", file=sys.stderr)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        print(f"lab: stopped vipd and {len(procs) + len(sendmails)} backends and sinks"
              + (f" ({len(sendmails)} sendmail)" if sendmails else "") + f"; files kept in {workdir}", flush=True)
    return 0


def _send_sample(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.outside.test", timeout=60) as s:
        s.sendmail("someone@outside.test", [f"postmaster@{INTERNAL_DOMAIN}"],
                   f"From: someone@outside.test\r\nTo: postmaster@{INTERNAL_DOMAIN}\r\n"
                   "Subject: through the DMZ\r\n\r\nIncoming, content security, delivery.\r\n")
        return "250"


def _wait_landed(folder: Path) -> str | None:
    for _ in range(300):
        found = sorted(folder.glob("*.eml")) if folder.exists() else []
        if found:
            return str(found[0])
        time.sleep(0.02)
    return None


def _explain(scenario: str, workdir: Path, vip_ports: dict[str, int], sinks: dict[str, str], admin: int) -> None:
    print(f"\nlab {scenario}: {DESCRIPTIONS[scenario]}")
    print(f"  Internet-facing VIP (mx): 127.0.0.1:{vip_ports['mx']}")
    for name, port in vip_ports.items():
        if name != "mx":
            print(f"  {name} VIP: 127.0.0.1:{port}" + ("   (internal hosts submit here)" if name == "content" else ""))
    print(f"  internal gateway sink: {sinks['gateway']} (files in {workdir / 'gateway'})")
    print(f"  outbound next hop sink: {sinks['outbound']} (files in {workdir / 'outbound'})")
    print(f"  status page: http://127.0.0.1:{admin}/   vipctl --admin http://127.0.0.1:{admin} show")
    print(f"Send: swaks --server 127.0.0.1:{vip_ports['mx']} --from you@outside.test --to user@{INTERNAL_DOMAIN}")
    print("Ctrl-C stops the lab.", flush=True)
