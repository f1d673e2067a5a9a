"""Several worker processes behind the same listeners: ``workers = N`` in the config.

Rules:
- The supervisor binds every listener once per worker with SO_REUSEPORT (all on the same port, also
  when the config says port 0), so the kernel spreads new connections over the workers.
- Each worker is a fresh ``python -m vipd worker`` process (exec, not a bare fork: an event loop and
  its threads do not survive fork), handed its sockets by file descriptor.
- Metrics add up across workers through prometheus_client's multiprocess mode; the supervisor serves
  the admin listener. SIGHUP and SIGTERM are passed on; a worker that dies unasked is restarted.
- The supervisor runs the health checks, once for all workers, and decides every server state but
  the passive marks (each worker's own failed connections); it publishes the states to its workers
  through vipd.net.control and, for an operator's change, answers only when every worker applied it.
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

from typing import Any

from ..config import Config
from ..log import LogBuffer, fmt
from .. import operator_state
from ..durable import pid_alive
from . import control
from .pools import PoolRuntime

APPLY_TIMEOUT_SECONDS = 5.0

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
    def __init__(self, config: Config, log: LogBuffer, run_dir: Path) -> None:
        from prometheus_client import CollectorRegistry

        from ..metrics import HealthMetrics
        self.config = config
        self.log = log
        self.run_dir = run_dir
        self.started = time.time()
        self.sockets = bind_listeners(config, config.workers)
        self.children: dict[int, subprocess.Popen] = {}
        self.stopping = False
        self.bound: dict[str, list[tuple[str, int]]] = {}
        for (vip, _, _), socks in self.sockets.items():
            host, port = socks[0].getsockname()[:2]
            self.bound.setdefault(vip, []).append((host, port))
            self.log.info("listening " + fmt(vip=vip, address=f"[{host}]:{port}" if ":" in host
                                             else f"{host}:{port}", workers=config.workers))
        self.health = HealthMetrics(CollectorRegistry())
        self.health.watch_states(lambda: list(self.pools.values()))
        if config.spool_dir is not None:
            from ..metrics import SpoolCollector
            from ..spool.store import Spool
            self.health.registry.register(SpoolCollector(Spool(config.spool_dir)))
        self.pools: dict[str, PoolRuntime] = {}
        self.generation = 0
        self.flush_seq = 0
        self.flush_pool: str | None = None
        self._publish_soon: asyncio.Handle | None = None
        self._apply_pools(config)
        operator_state.restore_from(config.state_file, self.pools, self.log)
        self.queue = self._queue_ops()
        self.publish()

    def _queue_ops(self):
        """A queue runner that never runs: the supervisor lists and changes entries, workers deliver."""
        if self.config.spool_dir is None:
            return None
        from ..spool.runner import QueueRunner
        from ..spool.store import Spool

        def vip(name: str):
            return self.config.vips.get(name) or next(iter(self.config.vips.values()))

        def route(vip_name: str, domain: str) -> PoolRuntime:
            v = vip(vip_name)
            name = v.routes.lookup(domain) if v.routes is not None and domain else None
            return self.pools.get(name or v.default_pool) or next(iter(self.pools.values()))

        return QueueRunner(Spool(self.config.spool_dir), self.config.queue, pools=lambda: self.pools,
                           route=route, hostname=lambda name: vip(name).hostname, log=self.log)

    # --- pools and their states --------------------------------------------------------------
    def _apply_pools(self, config: Config) -> None:
        for name, cfg in config.pools.items():
            if name in self.pools:
                self.pools[name].update(cfg)
            else:
                pool = self.pools[name] = PoolRuntime(cfg, self)
                pool.on_change = self._changed
        for name in [n for n in self.pools if n not in config.pools]:
            self.pools.pop(name).close()

    def transition(self, pool: str, server: str, old: str, new: str, reason: str) -> None:
        self.health.server_transitions.labels(pool, server, new).inc()
        say = self.log.warning if new == "down" else self.log.info
        say(f"server {new} " + fmt(pool=pool, server=server, was=old, reason=reason))
        self.log.flush()

    def failure(self, pool: str, server: str, detail: str) -> None:
        pass                    # transactions, and so their failures, happen in the workers

    def checked(self, pool: str, server: str, kind: str, result: Any) -> None:
        self.health.check_duration.labels(pool, kind).observe(result.duration_seconds)
        self.health.checks.labels(pool, kind, "ok" if result.ok else "failed").inc()

    def _changed(self) -> None:
        # Several inputs often change in one go (a check flips health and starts a ramp): one write.
        if self._publish_soon is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return          # the saved operator state, restored before the loop runs: __init__ publishes
            self._publish_soon = loop.call_soon(self.publish)

    def publish(self) -> int:
        """Write the current states for the workers and wake those that are listening."""
        self._publish_soon = None
        self.generation += 1
        control.write_control(self.run_dir, self.generation,
                              {name: pool.published() for name, pool in self.pools.items()},
                              flush=(self.flush_seq, self.flush_pool))
        for index, child in self.children.items():
            ack = control.read_ack(self.run_dir, index)
            # A worker acknowledges once it handles SIGUSR1; before that the signal would kill it,
            # and it reads the file at start anyway.
            if child.poll() is None and ack is not None and ack[0] == child.pid:
                child.send_signal(signal.SIGUSR1)
        return self.generation

    async def applied(self, generation: int) -> bool:
        """Wait until every running worker has applied ``generation``."""
        deadline = time.monotonic() + APPLY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            pending = [i for i, c in self.children.items() if c.poll() is None
                       and (ack := control.read_ack(self.run_dir, i)) is not None and ack[0] == c.pid
                       and ack[1] < generation]
            if not pending:
                return True
            await asyncio.sleep(0.01)
        return False

    def counts(self) -> tuple[dict[str, int], dict[tuple[str, str], tuple[int, int, int]]]:
        """Sessions per VIP and (active, selected, idle) per server, added up over the workers."""
        sessions: dict[str, int] = {}
        servers: dict[tuple[str, str], tuple[int, int, int]] = {}
        for index in self.children:
            doc = control.read_counts(self.run_dir, index) or {}
            for vip, n in doc.get("sessions", {}).items():
                sessions[vip] = sessions.get(vip, 0) + n
            for pool, per in doc.get("servers", {}).items():
                for server, values in per.items():
                    old = servers.get((pool, server), (0, 0, 0))
                    servers[(pool, server)] = tuple(a + b for a, b in zip(old, values))  # type: ignore[assignment]
        return sessions, servers

    # --- workers -----------------------------------------------------------------------------
    def spawn(self, index: int) -> None:
        fds = [lst[index].fileno() for lst in self.sockets.values()]
        args = [sys.executable, "-m", "vipd", "worker", "--config", str(self.config.path),
                "--index", str(index), "--parent", str(os.getpid()), "--run-dir", str(self.run_dir),
                *(a for arg in fd_args(self.sockets, index) for a in ("--fd", arg))]
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


class SupervisorFleet:
    """The admin API's view of several workers: states from the supervisor, counts from the workers."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.log = sup.log
        self._saving = asyncio.Lock()

    def status(self) -> dict[str, Any]:
        from ..status import status_document
        sessions, servers = self.sup.counts()
        cfg = self.sup.config
        return status_document(hostname=next(iter(cfg.vips.values())).hostname, started=self.sup.started,
                               workers=len(self.sup.children), vips=cfg.vips.values(), bound=self.sup.bound,
                               sessions=sessions, pools=self.sup.pools.values(),
                               counts=lambda pool, server: servers.get((pool, server), (0, 0, 0)))

    async def _published(self) -> None:
        if not await self.sup.applied(self.sup.publish()):
            self.log.warning("admin change not yet applied by every worker "
                             + fmt(timeout_seconds=APPLY_TIMEOUT_SECONDS))

    async def set_pool(self, pool: str, held: bool, who: str) -> dict[str, Any]:
        from ..admin import apply_pool, log_change
        from ..status import pool_document
        runtime = apply_pool(self.sup.pools, pool, held)
        log_change(self.log, who, pool, held=held)
        await operator_state.keep(self.sup.config.state_file, self.sup.pools, self.log, self._saving)
        await self._published()
        _, servers = self.sup.counts()
        return pool_document(runtime, lambda p, s: servers.get((p, s), (0, 0, 0)))

    async def set_server(self, pool: str, server: str, changes: dict[str, Any], who: str) -> dict[str, Any]:
        from ..admin import apply_server, log_change
        from ..status import server_document
        runtime = apply_server(self.sup.pools, pool, server, changes, who)
        log_change(self.log, who, pool, server, **changes)
        await operator_state.keep(self.sup.config.state_file, self.sup.pools, self.log, self._saving)
        await self._published()
        _, servers = self.sup.counts()
        return server_document(runtime, server, lambda p, s: servers.get((p, s), (0, 0, 0)))

    def queue_runner(self):
        return self.sup.queue

    async def queue_flush(self, pool: str | None, who: str) -> int | None:
        from ..admin import FleetError, log_queue_flush
        if self.sup.queue is None:
            raise FleetError(404, "no failover queue: spool_dir is not set in the configuration")
        self.sup.flush_seq += 1
        self.sup.flush_pool = pool
        log_queue_flush(self.log, who, pool, None)
        await self._published()
        return None

    def metrics(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        # The workers' metrics added up, then the supervisor's own: checks and server states.
        return generate_latest(registry) + generate_latest(self.sup.health.registry)


RUN_DIR_PREFIX = "vipd-run-"


def sweep_stale_run_dirs(folder: Path) -> list[Path]:
    """Remove the run folders of supervisors that are gone (one killed with SIGKILL cannot remove
    its own): each is named after its supervisor's PID. A PID in use keeps its folder, even if the
    PID was reused: leaving a folder is the safe mistake. What was removed."""
    removed = []
    for path in folder.glob(f"{RUN_DIR_PREFIX}*-*"):
        pid = path.name[len(RUN_DIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def run_supervisor(config: Config) -> int:
    """Run ``config.workers`` workers until SIGTERM/SIGINT; returns the exit code."""
    sweep_stale_run_dirs(Path(tempfile.gettempdir()))
    run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))
    mpdir = run_dir / "metrics"
    mpdir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mpdir)
    log = LogBuffer(level=config.log_level)
    sup = Supervisor(config, log, run_dir)
    for index in range(config.workers):
        sup.spawn(index)

    async def main() -> None:
        from .monitor import Monitor
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        monitor = Monitor(next(iter(config.vips.values())).hostname)
        monitor.sync(sup.pools)
        admin = access = None

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
            sup._apply_pools(sup.config)
            if access is not None:
                access.reload(sup.config.admin, log)
            monitor.sync(sup.pools)
            sup.publish()
            sup.signal_all(signal.SIGHUP)
            log.info("reload passed on " + fmt(workers=len(sup.children)))

        loop.add_signal_handler(signal.SIGTERM, on_stop)
        loop.add_signal_handler(signal.SIGINT, on_stop)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        if config.admin is not None:
            from ..admin import AdminAccess, serve
            access = AdminAccess(config.admin)
            admin, _ = await serve(SupervisorFleet(sup), config.admin.listen.host, config.admin.listen.port,
                                   access)
        log.flush()
        while not stop.is_set():
            sup.reap()
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass
        monitor.close()
        for pool in sup.pools.values():
            pool.close()
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
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0
