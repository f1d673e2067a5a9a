"""Helpers the tests share: start real processes (sinks, vipd) on free ports, and clean them up.

Every process is started with its output in a file (never a pipe nobody reads), its port taken from
what it prints after binding port 0, and stopped by PID at the end of the test, also on failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.sink import StoredMessage, read_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CHECK_INTERVAL, CHECK_RISE, CHECK_FALL = 0.3, 2, 2


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(5)


def start(name: str, args: list[str], log: Path, env: dict | None = None) -> Proc:
    fh = open(log, "wb")
    popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    fh.close()
    return Proc(name, popen, log)


@dataclass
class Sink:
    proc: Proc
    store: Path
    port: int
    name: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def messages(self) -> list[StoredMessage]:
        return read_store(self.store)


@dataclass
class Vipd:
    proc: Proc
    config: Path
    ports: dict[str, list[int]] = field(default_factory=dict)
    admin_port: int | None = None

    def port(self, vip: str = "mx") -> int:
        return self.ports[vip][0]

    def smtp(self, vip: str = "mx", **kw) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port(vip), local_hostname="client.test", timeout=30, **kw)

    def log(self) -> str:
        return self.proc.text()


@dataclass
class Agent:
    proc: Proc
    load_file: Path
    port: int

    def set_load(self, load: float) -> None:
        """Write a /proc/loadavg-format file; the agent reads it afresh on every connection."""
        tmp = self.load_file.with_suffix(".tmp")
        tmp.write_text(f"{load:.2f} {load:.2f} {load:.2f} 1/100 12345\n")
        tmp.replace(self.load_file)


class Admin:
    """The admin API of a running vipd, over HTTP (status, metrics) and through the real vipctl."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.token = token

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(self.url + path)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.read()

    def status(self) -> dict:
        return json.loads(self.get("/api/status"))

    def server(self, pool: str, name: str) -> dict:
        found = [s for p in self.status()["pools"] if p["name"] == pool for s in p["servers"] if s["name"] == name]
        assert found, f"no server {pool}/{name}"
        return found[0]

    def pool(self, name: str) -> dict:
        return next(p for p in self.status()["pools"] if p["name"] == name)

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample's value from /metrics (None when absent)."""
        text = self.get("/metrics").decode()
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == (f"{name}{{{want}}}" if want else name):
                return float(value)
        return None

    def vipctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        extra = ["--token", self.token] if self.token else []
        out = subprocess.run([PYTHON, "-m", "vipd.vipctl", "--admin", self.url, *extra, *args],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        if check:
            assert out.returncode == 0, out.stderr
        return out


class Lab:
    """Starts sinks and vipd for one test, and stops them all afterwards."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def backend(self, module: str, *args: str, name: str | None = None, env: dict | None = None
                ) -> tuple[int, Proc]:
        """``python -m backends.MODULE --listen 127.0.0.1:0 ARGS``: (its port, its process) once it listens."""
        name = name or module
        proc = start(name, [PYTHON, "-m", f"backends.{module}", "--listen", "127.0.0.1:0", *args],
                     self.tmp / f"{name}.log", env=env)
        self.procs.append(proc)
        match = wait_for(lambda: proc_check(proc) and re.search(r"listening on [\d.]+:(\d+)", proc.text()),
                         what=f"{name} to listen")
        return int(match.group(1)), proc

    def sink(self, name: str, *extra: str) -> Sink:
        store = self.tmp / name
        port, proc = self.backend("sink", "--store", str(store), "--name", name, *extra, name=name)
        return Sink(proc, store, port, name)

    def restart_sink(self, sink: Sink, *extra: str) -> Sink:
        """Start a sink again on the same port and store."""
        log = self.tmp / f"{sink.name}.restart.log"
        proc = start(sink.name, [PYTHON, "-m", "backends.sink", "--listen", sink.address, "--store",
                                 str(sink.store), "--name", sink.name, *extra], log)
        self.procs.append(proc)
        wait_for(lambda: proc_check(proc) and "listening on" in proc.text(), what="sink restart")
        return Sink(proc, sink.store, sink.port, sink.name)

    def agent(self, name: str, load: float, queue_load: float = 8.0, refuse_load: float = 12.0) -> Agent:
        """A load-average agent (``vipd-agent``) reading its own load file, on a free port."""
        load_file = self.tmp / f"{name}.loadavg"
        agent = Agent(None, load_file, 0)  # type: ignore[arg-type]
        agent.set_load(load)
        proc = start(name, [PYTHON, "-m", "health.agent", "--listen", "127.0.0.1:0", "--loadavg-file",
                            str(load_file), "--queue-load", str(queue_load), "--refuse-load", str(refuse_load)],
                     self.tmp / f"{name}.log")
        self.procs.append(proc)
        match = wait_for(lambda: proc_check(proc) and re.search(r"listening on [\d.]+:(\d+)", proc.text()),
                         what=f"agent {name} to listen")
        agent.proc, agent.port = proc, int(match.group(1))
        return agent

    def vipd(self, config_text: str, name: str = "vipd", vips: tuple[str, ...] = ("mx",),
             wrap: list[str] | None = None) -> Vipd:
        """vipd on ``config_text``; ``wrap``: a command line to run it under (``{cmd}`` stands for it)."""
        cfg = self.tmp / f"{name}.toml"
        cfg.write_text(config_text)
        log = self.tmp / f"{name}.log"
        cmd = [PYTHON, "-m", "vipd", "run", "--config", str(cfg)]
        if wrap:
            import shlex
            cmd = [part.replace("{cmd}", shlex.join(cmd)) for part in wrap]
        proc = start(name, cmd, log)
        self.procs.append(proc)
        vipd = Vipd(proc, cfg)

        def ready():
            proc_check(proc)
            text = proc.text()
            found = {v: [int(p) for p in re.findall(rf"listening vip={re.escape(v)} address=\S+:(\d+)", text)]
                     for v in vips}
            if "[admin]" in config_text and "admin listening" not in text:
                return None
            return found if all(found.values()) else None

        vipd.ports = wait_for(ready, what="vipd to listen")
        admin = re.search(r"admin listening address=\S+:(\d+)", proc.text())
        vipd.admin_port = int(admin.group(1)) if admin else None
        return vipd

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def proc_check(proc: Proc) -> bool:
    if not proc.alive():
        raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.text()[-3000:]}")
    return True


def pool_config(*sinks: Sink, balance: str = "roundrobin", extra_vip: str = "", extra_pool: str = "",
                admin: bool = True, top: str = "", trusted: bool = True) -> str:
    """A config with one VIP before ``sinks``; ``trusted``: 127/8 may relay (most tests send anywhere)."""
    servers = ", ".join(f'"{s.address}"' for s in sinks)
    text = f"""{top}
[vip.mx]
listen = ["127.0.0.1:0"]
hostname = "mx.vipd.test"
default_pool = "incoming"
{'trusted_networks = ["127.0.0.0/8", "::1/128"]' if trusted else ""}
{extra_vip}

[pool.incoming]
balance = "{balance}"
servers = [{servers}]
{extra_pool}
"""
    if admin:
        text += '\n[admin]\nlisten = "127.0.0.1:0"\n'
    return text


def health_config(sinks: list[Sink], health: str = "", extra_pool: str = "", names: list[str] | None = None,
                  agents: dict[str, int] | None = None, admin_extra: str = "") -> str:
    """One VIP before a pool of named servers with active checks (fast ones, for tests) and an admin API."""
    names = names or [s.name for s in sinks]
    servers = []
    for sink, name in zip(sinks, names):
        agent = f", agent_port = {agents[name]}" if agents and name in agents else ""
        servers.append(f'{{ address = "{sink.address}", name = "{name}"{agent} }}')
    return f"""
[vip.mx]
listen = ["127.0.0.1:0"]
hostname = "mx.vipd.test"
default_pool = "incoming"
trusted_networks = ["127.0.0.0/8"]

[pool.incoming]
servers = [{", ".join(servers)}]
health = {{ {health or f"interval_seconds = {CHECK_INTERVAL}, rise = {CHECK_RISE}, fall = {CHECK_FALL}"} }}
{extra_pool}

[admin]
listen = "127.0.0.1:0"
{admin_extra}
"""


def raw_session(port: int, data: bytes, *, expect_replies: int, timeout: float = 10.0) -> list[bytes]:
    """Send bytes (after the greeting) on a raw socket; return complete reply lines (last lines only)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        buf = b""
        while b"\r\n" not in buf:
            buf += sock.recv(4096)
        sock.sendall(data)
        replies: list[bytes] = []
        buf = b""
        while len(replies) < expect_replies:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\r\n")
            replies += [ln for ln in lines if len(ln) >= 4 and ln[3:4] == b" "]
        return replies


def send_data(port: int, data: bytes) -> tuple[int, bytes]:
    """One message from a@example.org to b@example.com: the reply to DATA."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        s.mail("a@example.org")
        s.rcpt("b@example.com")
        return s.data(data)


def run_against(handler, tmp_path: Path, call):
    """Run ``call(unix_path)`` against a small unix server of the test's own that handles each connection
    with ``handler``: for the failure paths of a client (silence, garbage, a closed connection)."""
    path = str(tmp_path / "fake.sock")

    async def handle(reader, writer):
        try:
            await handler(reader, writer)
        finally:
            writer.transport.abort()

    async def main():
        server = await asyncio.start_unix_server(handle, path)
        async with server:
            return await call(path)
    return asyncio.run(main())
