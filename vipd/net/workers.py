"""Several worker processes behind the same listeners: ``workers = N`` in the config.

Rules:
- The supervisor binds every listener once per worker with SO_REUSEPORT (all on the same port, also
  when the config says port 0), so the kernel spreads new connections over the workers.
- Each worker is a fresh ``python -m vipd worker`` process (exec, not a bare fork: an event loop and
  its threads do not survive fork), handed its sockets by file descriptor.
- Metrics add up across workers through prometheus_client's multiprocess mode; the supervisor serves
  the admin listener. SIGHUP and SIGTERM are passed on; a worker that dies unasked is restarted.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..config import Config
from ..log import LogBuffer, fmt

__all__ = ["run_supervisor", "parse_fd_args"]

RESTART_DELAY_SECONDS = 1.0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def bind_listeners(config: Config, workers: int) -> dict[tuple[str, str, int], list[socket.socket]]:
    """Per listener, one socket for each worker, all bound to the same port."""
    out: dict[tuple[str, str, int], list[socket.socket]] = {}
    for vip in config.vips.values():
        for ep in vip.listen:
            first = _bind(ep.host, ep.port)
            port = first.getsockname()[1]
            out[(vip.name, ep.host, ep.port)] = [first] + [_bind(ep.host, port) for _ in range(workers - 1)]
    return out


def fd_args(socks: dict[tuple[str, str, int], list[socket.socket]], index: int) -> list[str]:
    return [f"{vip},{host},{port},{lst[index].fileno()}" for (vip, host, port), lst in socks.items()]


def parse_fd_args(items: list[str]) -> dict[tuple[str, str, int], socket.socket]:
    out = {}
    for item in items:
        vip, rest = item.split(",", 1)
        host, port, fd = rest.rsplit(",", 2)
        out[(vip, host, int(port))] = socket.socket(fileno=int(fd))
    return out


class Supervisor:
    def __init__(self, config: Config, log: LogBuffer) -> None:
        self.config = config
        self.log = log
        self.sockets = bind_listeners(config, config.workers)
        self.children: dict[int, subprocess.Popen] = {}
        self.stopping = False
        self.bound: dict[str, list[tuple[str, int]]] = {}
        for (vip, _, _), socks in self.sockets.items():
            host, port = socks[0].getsockname()[:2]
            self.bound.setdefault(vip, []).append((host, port))
            self.log.info("listening " + fmt(vip=vip, address=f"[{host}]:{port}" if ":" in host
                                             else f"{host}:{port}", workers=config.workers))

    def spawn(self, index: int) -> None:
        fds = [lst[index].fileno() for lst in self.sockets.values()]
        args = [sys.executable, "-m", "vipd", "worker", "--config", str(self.config.path),
                "--index", str(index), "--parent", str(os.getpid()), *(a for arg in fd_args(self.sockets, index) for a in ("--fd", arg))]
        self.children[index] = subprocess.Popen(args, pass_fds=fds, stdin=subprocess.DEVNULL)
        self.log.info("worker started " + fmt(worker=index, pid=self.children[index].pid))

    def signal_all(self, sig: int) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(sig)

    def reap(self) -> None:
        """Restart workers that died while we were not stopping."""
        from prometheus_client import multiprocess
        for index, child in list(self.children.items()):
            code = child.poll()
            if code is None:
                continue
            multiprocess.mark_process_dead(child.pid)
            if self.stopping:
                continue
            self.log.error("worker died, restarting " + fmt(worker=index, pid=child.pid, code=code))
            time.sleep(RESTART_DELAY_SECONDS)
            self.spawn(index)

    def status_text(self) -> str:
        lines = [f"workers {len(self.children)} pids="
                 + ",".join(str(c.pid) for c in self.children.values())]
        for name, vip in self.config.vips.items():
            addrs = " ".join(f"{h}:{p}" for h, p in self.bound.get(name, []))
            lines.append(f"vip {name} listen={addrs} default_pool={vip.default_pool}")
        for name, pool in self.config.pools.items():
            lines.append(f"pool {name} balance={pool.balance}")
            for s in pool.servers:
                lines.append(f"  server {s.name} address={s.endpoint} weight={s.weight} "
                             f"backup={str(s.backup).lower()}")
        return "\n".join(lines) + "\n"


async def _serve_admin(sup: Supervisor):
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    async def metrics(_: web.Request) -> web.Response:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(_: web.Request) -> web.Response:
        return web.Response(text=sup.status_text())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", status)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    assert sup.config.admin is not None
    site = web.TCPSite(runner, sup.config.admin.listen.host, sup.config.admin.listen.port,
                       reuse_address=True)
    await site.start()
    for sock in (site._server.sockets if site._server else []):  # type: ignore[union-attr]
        host, port = sock.getsockname()[:2]
        sup.log.info(f"admin listening address={host}:{port}")
    return runner


def run_supervisor(config: Config) -> int:
    """Run ``config.workers`` workers until SIGTERM/SIGINT; returns the exit code."""
    mpdir = tempfile.mkdtemp(prefix="vipd-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mpdir
    log = LogBuffer(level=config.log_level)
    sup = Supervisor(config, log)
    for index in range(config.workers):
        sup.spawn(index)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_stop() -> None:
            sup.stopping = True
            sup.signal_all(signal.SIGTERM)
            stop.set()

        def on_hup() -> None:
            from .. import config as config_mod
            try:
                sup.config = config_mod.load(Path(sup.config.path))
            except config_mod.ConfigError as exc:
                for err in exc.errors:
                    log.error(f"reload failed, keeping the running config: {err}")
                return
            sup.signal_all(signal.SIGHUP)
            log.info("reload passed on " + fmt(workers=len(sup.children)))

        loop.add_signal_handler(signal.SIGTERM, on_stop)
        loop.add_signal_handler(signal.SIGINT, on_stop)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        admin = await _serve_admin(sup) if config.admin is not None else None
        log.flush()
        while not stop.is_set():
            sup.reap()
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass
        deadline = time.monotonic() + config.grace_seconds + 5
        while any(c.poll() is None for c in sup.children.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for child in sup.children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
        if admin is not None:
            await admin.cleanup()
        log.info("stopped")
        log.flush()

    try:
        asyncio.run(main())
    finally:
        for socks in sup.sockets.values():
            for sock in socks:
                sock.close()
        shutil.rmtree(mpdir, ignore_errors=True)
    return 0
