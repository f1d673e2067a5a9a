"""``vipd lab``: the embedded default topology on loopback, for a first look.

Two of the project's sink backends (separate processes), one VIP in front of them (this process),
a sample message sent through it and shown where it landed; then it serves until Ctrl-C and stops
everything it started.
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

from backends.child_daemon import die_with_parent

__all__ = ["run_lab", "lab_config"]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _start_sink(workdir: Path, name: str) -> tuple[subprocess.Popen, int]:
    log = open(workdir / f"{name}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "backends.sink", "--listen", "127.0.0.1:0",
                             "--store", str(workdir / name), "--name", name,
                             "--xclient-from", "127.0.0.0/8"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            cwd=Path(__file__).resolve().parent.parent, preexec_fn=die_with_parent)
    log.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = (workdir / f"{name}.log").read_text(errors="replace")
        match = re.search(r"listening on [\d.]+:(\d+)", text)
        if match:
            return proc, int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"sink {name} did not start:\n{(workdir / f'{name}.log').read_text()}")


def lab_config(port: int, sink_ports: list[int]) -> str:
    servers = ", ".join(f'"127.0.0.1:{p}"' for p in sink_ports)
    return f"""# Written by `vipd lab`: one VIP on loopback before two sink backends.
spool_dir = "spool"                     # the failover queue: try `vipctl ... pool hold incoming`

[vip.mx]
listen = ["127.0.0.1:{port}"]
hostname = "mx.lab.vipd.test"
banner = "$hostname ESMTP vipd lab"
default_pool = "incoming"
relay_domains = ["example.com", ".example.com"]   # mail for these is accepted from anyone

[pool.incoming]
balance = "roundrobin"
servers = [{servers}]
health = {{ interval_seconds = 2.0, rise = 2, fall = 2 }}   # SMTP checks; see docs/health.md

[admin]
listen = "127.0.0.1:0"
"""


def _send_sample(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.lab.vipd.test", timeout=30) as smtp:
        smtp.sendmail("sender@example.org", ["postmaster@example.com"],
                      "From: sender@example.org\r\nTo: postmaster@example.com\r\n"
                      "Subject: hello from the vipd lab\r\n\r\nThis message went through the VIP.\r\n")
        return smtp.noop()[1].decode()


def _landed(workdir: Path, names: list[str]) -> Path | None:
    for name in names:
        for path in sorted((workdir / name).glob("*.eml")):
            return path
    return None


def run_lab(port: int = 2525, workdir: Path | None = None, once: bool = False) -> int:
    from . import config as config_mod
    from .net.daemon import Daemon

    workdir = Path(workdir or tempfile.mkdtemp(prefix="vipd-lab-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not _port_free(port):
        print(f"lab: port {port} is taken; using any free port")
        port = 0
    sinks = []
    try:
        for name in ("sink1", "sink2"):
            sinks.append((name, *_start_sink(workdir, name)))
        cfg_path = workdir / "vipd.toml"
        cfg_path.write_text(lab_config(port, [p for _, _, p in sinks]))
        cfg = config_mod.load(cfg_path)

        async def main() -> None:
            daemon = Daemon(cfg)
            task = asyncio.ensure_future(daemon.run())
            while "mx" not in daemon.bound and not task.done():
                await asyncio.sleep(0.02)
            if task.done():
                await task
                return
            # A lab lives in a terminal: SIGHUP means the terminal went away, not "reload".
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, daemon.request_stop)
            vip_port = daemon.bound["mx"][0][1]
            admin_port = daemon.bound.get("admin", [("", 0)])[0][1]
            await asyncio.to_thread(_send_sample, vip_port)
            path = None
            for _ in range(200):
                path = _landed(workdir, [n for n, _, _ in sinks])
                if path:
                    break
                await asyncio.sleep(0.02)
            daemon.log.flush()
            _explain(workdir, cfg_path, vip_port, admin_port, sinks, path)
            if once:
                daemon.request_stop()
            await task

        asyncio.run(main())
    finally:
        for name, proc, _ in sinks:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        print(f"lab: stopped vipd and {len(sinks)} sinks; files kept in {workdir}")
    return 0


def _explain(workdir: Path, cfg: Path, port: int, admin_port: int, sinks, path: Path | None) -> None:
    print()
    print(f"lab: VIP mx listening on 127.0.0.1:{port}, balancing over "
          + " and ".join(f"{n} (127.0.0.1:{p})" for n, _, p in sinks))
    print(f"lab: config {cfg}")
    if path is None:
        print("lab: the sample message did not arrive; see the log lines above")
    else:
        body = path.read_bytes().split(b"\n", 1)[1].decode(errors="replace")
        print(f"lab: a sample message was sent through the VIP and landed in {path}:")
        for line in body.splitlines()[:6]:
            print(f"    {line}")
    print()
    print("Send your own:")
    print(f"  swaks --server 127.0.0.1:{port} --helo client.example --from you@example.org --to someone@example.com")
    print(f"  python3 -c \"import smtplib; smtplib.SMTP('127.0.0.1', {port}).sendmail("
          f"'you@example.org', ['someone@example.com'], 'Subject: hi\\r\\n\\r\\nhello\\r\\n')\"")
    print(f"Messages land in {workdir}/sink1 and {workdir}/sink2 (one file each), in turn.")
    print("Recipients must be in example.com (the lab's relay domain): others get 550 5.7.1 Relaying denied.")
    if admin_port:
        admin = f"http://127.0.0.1:{admin_port}"
        print(f"Status page: {admin}/   metrics: curl {admin}/metrics")
        print(f"Servers: vipctl --admin {admin} show   (then: server drain incoming/127.0.0.1:PORT, "
              "pool hold incoming, ...)")
    print("The email DMZ's whole designs (incoming, content security, delivery pools): "
          "vipd lab scenario1|scenario2|scenario3")
    print("Ctrl-C stops the lab.", flush=True)
