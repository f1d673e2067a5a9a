"""The daemon: listeners for every VIP, the pools behind them, reload, graceful stop, periodic sweeps.

Rules:
- Config is swapped whole: a reload builds a new ``Config`` first and changes nothing if it is invalid.
  Sessions keep the VIP settings they started with; every new transaction looks its pool up afresh,
  so a changed pool takes effect at the next transaction.
- Stop (SIGTERM/SIGINT): listeners close at once; sessions between transactions get 421 now, the
  others finish their transaction first; after ``grace_seconds`` the rest get 421 and are closed.
- One sweep a second enforces idle and session timeouts and expires idle backend connections.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from pathlib import Path

from .. import config as config_mod
from .. import operator_state
from ..config import Config, VipConfig
from ..log import LogBuffer, fmt
from ..metrics import Metrics
from ..smtp import replies
from ..policy.dnsfacts import DnsFacts
from ..policy.limits import ClientLimiter, check_load
from ..smtp.replies import Reply
from ..smtp.server import Limits
from . import control
from .monitor import Monitor
from .pools import PoolRuntime
from ..spool.runner import QueueRunner
from ..spool.store import Spool
from .screen import Prepared, Screen, prepare
from .tls import server_context
from .session import Session, limits_for

if TYPE_CHECKING:
    from ..admin import AdminAccess

__all__ = ["Daemon"]

SWEEP_SECONDS = 1.0


class Daemon:
    def __init__(self, config: Config, log: LogBuffer | None = None,
                 metrics: Metrics | None = None, *, worker: int | None = None,
                 listen_sockets: dict[tuple[str, str, int], socket.socket] | None = None,
                 parent: int | None = None, run_dir: Path | None = None) -> None:
        """``worker``/``listen_sockets``/``run_dir``: run as one of several workers on sockets bound by
        the supervisor (vipd.net.workers), taking server states from it through files in ``run_dir``;
        a lone daemon binds its own sockets, runs the checks and serves the admin listener."""
        self.config = config
        self.worker = worker
        # The supervisor's PID as it gave it: a worker that started after its death must notice too.
        self._parent = parent if parent is not None else os.getppid()
        self._inherited = dict(listen_sockets or {})
        self.log = log or LogBuffer(level=config.log_level)
        self.metrics = metrics or Metrics()
        self.pools: dict[str, PoolRuntime] = {}
        self.limits: dict[str, Limits] = {}
        self.sessions: set[Session] = set()
        self.per_vip: dict[str, int] = {}
        self.stopping = False
        self._servers: dict[tuple[str, str, int], asyncio.base_events.Server] = {}
        self.bound: dict[str, list[tuple[str, int]]] = {}
        self._stop = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._reply_counters: dict[str, Callable[[int], None]] = {}
        self._date = (0, "")
        self._admin = None
        self._admin_access: AdminAccess | None = None
        self._limiters: dict[str, ClientLimiter] = {}
        self._prepared: dict[str, Prepared] = {}
        self.dns: DnsFacts | None = None
        self.monitor: Monitor | None = None
        self.started = time.time()
        self.run_dir = run_dir
        self.queue: QueueRunner | None = None
        self._flush_seq = -1          # the first control file read sets it: old flushes are not redone
        self._apply(config)
        if worker is None:
            self.metrics.watch_pools(lambda: list(self.pools.values()))
            # A worker of several takes these from its supervisor, which restores them.
            operator_state.restore_from(config.state_file, self.pools, self.log)

    # --- configuration -----------------------------------------------------------------------
    def _apply(self, config: Config) -> None:
        for name, cfg in config.pools.items():
            if name in self.pools:
                self.pools[name].update(cfg)
            else:
                pool = self.pools[name] = PoolRuntime(cfg, self, checks_elsewhere=self.worker is not None)
                pool.on_change = lambda p=pool: self.queue.pool_changed(p) if self.queue else None
        for name in [n for n in self.pools if n not in config.pools]:
            self.pools.pop(name).close()
        if self.monitor is not None:
            self.monitor.sync(self.pools)
        self.limits = {name: limits_for(vip) for name, vip in config.vips.items()}
        self._tls = self._tls_contexts(config)
        self._prepared = {}
        if config.nameservers != getattr(self.config, "nameservers", None) or self.dns is None:
            self.dns = _dns_facts(config, self.metrics)
        self.config = config
        self.log.set_level(config.log_level)
        if self.queue is not None:
            self.queue.settings = config.queue

    # --- what pools report (vipd.net.pools.PoolEvents) ---------------------------------------
    def transition(self, pool: str, server: str, old: str, new: str, reason: str) -> None:
        if self.metrics.health is not None:
            self.metrics.health.server_transitions.labels(pool, server, new).inc()
        say = self.log.warning if new == "down" else self.log.info
        say(f"server {new} " + fmt(pool=pool, server=server, was=old, reason=reason))
        self.log.flush()            # rare, and an operator watching the log wants it now

    def failure(self, pool: str, server: str, detail: str) -> None:
        self.metrics.backend_failures.labels(pool, server).inc()
        self.log.info("backend failed " + fmt(pool=pool, server=server, reason=detail))

    def checked(self, pool: str, server: str, kind: str, result) -> None:
        if self.metrics.health is not None:
            self.metrics.health.check_duration.labels(pool, kind).observe(result.duration_seconds)
            self.metrics.health.checks.labels(pool, kind, "ok" if result.ok else "failed").inc()

    def route(self, vip: VipConfig, domain: str) -> PoolRuntime:
        """The pool for a recipient domain, looked up in the current config."""
        current = self.config.vips.get(vip.name, vip)
        name = current.routes.lookup(domain) if current.routes is not None and domain else None
        pool = self.pools.get(name or current.default_pool)
        if pool is None:
            pool = self.pools[current.default_pool] if current.default_pool in self.pools \
                else next(iter(self.pools.values()))
        return pool

    def helo_name(self, vip: VipConfig) -> str:
        return vip.hostname

    def _tls_contexts(self, config: Config) -> dict:
        """A STARTTLS context per VIP; a reload that cannot read a certificate keeps the old one."""
        out = {}
        for name, vip in config.vips.items():
            try:
                ctx = server_context(vip)
            except (OSError, ssl.SSLError) as exc:
                self.log.error("TLS context failed, keeping the previous one " + fmt(vip=name, reason=str(exc)))
                ctx = getattr(self, "_tls", {}).get(name)
            if ctx is not None:
                out[name] = ctx
        return out

    def tls_context(self, vip: VipConfig):
        return self._tls.get(vip.name)

    def over_queue_load(self, vip: VipConfig) -> bool:
        """sendmail's QueueLA: above ``queue_load`` mail is accepted and queued, not relayed now."""
        return self.queue is not None and vip.queue_load is not None and os.getloadavg()[0] >= vip.queue_load

    def _hostname(self, vip_name: str) -> str:
        vip = self.config.vips.get(vip_name) or next(iter(self.config.vips.values()))
        return vip.hostname

    def _route_by_name(self, vip_name: str, domain: str) -> PoolRuntime:
        vip = self.config.vips.get(vip_name) or next(iter(self.config.vips.values()))
        return self.route(vip, domain)

    def _start_queue(self) -> None:
        if self.config.spool_dir is None:
            return
        spool = Spool(self.config.spool_dir)
        self.queue = QueueRunner(spool, self.config.queue, pools=lambda: self.pools, route=self._route_by_name,
                                 hostname=self._hostname, log=self.log, metrics=self.metrics)
        if self.worker is None:
            self.metrics.watch_spool(spool)
        self.queue.start()

    async def reload(self) -> bool:
        try:
            new = await asyncio.to_thread(config_mod.load, self.config.path)
        except config_mod.ConfigError as exc:
            for err in exc.errors:
                self.log.error(f"reload failed, keeping the running config: {err}")
            self.metrics.config_reloads.labels("failed").inc()
            return False
        self._apply(new)
        await self._sync_listeners()
        if self._admin_access is not None:
            self._admin_access.reload(new.admin, self.log)
        if self.worker is not None:
            self.apply_control()
        self.metrics.config_reloads.labels("ok").inc()
        self.log.info("reloaded " + fmt(config=str(new.path), vips=len(new.vips), pools=len(new.pools)))
        return True

    # --- a worker of several: server states from the supervisor -----------------------------
    def apply_control(self, ack: bool = True) -> None:
        """Apply the supervisor's published server states, then say which generation is applied
        (``ack``: only once SIGUSR1 is handled, for the supervisor signals the workers that said so)."""
        if self.run_dir is None or self.worker is None:
            return
        doc = control.read_control(self.run_dir)
        if doc is None:
            return
        for name, published in doc.get("pools", {}).items():
            pool = self.pools.get(name)
            if pool is not None:
                pool.apply_published(published)
        flush = doc.get("flush") or {}
        seq = flush.get("seq", 0)
        if self.queue is not None and seq > self._flush_seq and self._flush_seq >= 0:
            self.queue.flush(flush.get("pool"))
        self._flush_seq = seq
        if ack:
            control.write_ack(self.run_dir, self.worker, doc.get("generation", 0))

    def _write_counts(self) -> None:
        if self.run_dir is None or self.worker is None:
            return
        counts = {p.name: {b.name: [b.active, b.selected, p.idle_count(b.name)] for b in p.balancer.backends}
                  for p in self.pools.values()}
        control.write_counts(self.run_dir, self.worker, {"sessions": dict(self.per_vip), "servers": counts})

    # --- sessions ----------------------------------------------------------------------------
    def admit(self, session: Session) -> Reply | None:
        """Count a new session, or the reply that refuses it (shutdown, limits, load)."""
        vip = session.vip
        name = vip.name
        refusal = None
        if self.stopping:
            refusal, reason = replies.SHUTTING_DOWN, "stopping"
        elif self.per_vip.get(name, 0) >= vip.max_sessions:
            refusal, reason = replies.TOO_MANY_SESSIONS, "max_sessions"
        else:
            verdict = check_load(os.getloadavg()[0], vip.refuse_load) if vip.refuse_load else None
            if verdict is None or not verdict.refuses:
                verdict = self._limiter(vip).admit(session.ip, time.monotonic())
            if verdict.refuses:
                refusal, reason = verdict.reply, verdict.check
                self.count_verdict(verdict.check, verdict.kind)
        if refusal is not None:
            self.metrics.sessions_refused.labels(name, reason).inc()
            self.log.info(f"{session.sid}: reject " + fmt(client=f"[{session.ip}]:{session.port}",
                                                          check=reason, reply=str(refusal)))
            return refusal
        self.per_vip[name] = self.per_vip.get(name, 0) + 1
        self.sessions.add(session)
        self.metrics.sessions.labels(name).inc()
        self.metrics.sessions_active.labels(name).inc()
        return None

    def _limiter(self, vip: VipConfig) -> ClientLimiter:
        limiter = self._limiters.get(vip.name)
        if limiter is None:
            limiter = self._limiters[vip.name] = ClientLimiter()
        # A reload may change the limits; the counts carry on.
        limiter.max_concurrent = vip.max_sessions_per_client
        limiter.max_per_minute = vip.max_connections_per_client_per_minute
        return limiter

    def screen(self, session: Session) -> Screen:
        vip = session.vip
        prepared = self._prepared.get(vip.name)
        if prepared is None or session.vip is not self.config.vips.get(vip.name):
            ours = frozenset(h for addrs in self.bound.values() for h, _ in addrs)
            prepared = prepare(vip, ours)
            if vip is self.config.vips.get(vip.name):
                self._prepared[vip.name] = prepared
        return Screen(vip, session.ip, self.dns, prepared)

    def count_verdict(self, check: str, kind: str) -> None:
        self.metrics.policy_verdicts.labels(check, kind).inc()

    def release(self, session: Session) -> bool:
        if session not in self.sessions:
            return False
        self.sessions.discard(session)
        name = session.vip.name
        self.per_vip[name] -= 1
        self._limiter(session.vip).release(session.ip)
        self.metrics.sessions_active.labels(name).dec()
        if self.stopping and not self.sessions:
            self._stop.set()
        return True

    def reply_counter(self, listener: str) -> Callable[[int], None]:
        counter = self._reply_counters.get(listener)
        if counter is None:
            children: dict[int, object] = {}
            family = self.metrics.replies

            def count(code: int) -> None:
                child = children.get(code)
                if child is None:
                    child = children[code] = family.labels(listener, str(code))
                child.inc()  # type: ignore[attr-defined]

            counter = self._reply_counters[listener] = count
        return counter

    def date_header(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, localtime=True))
        return self._date[1]

    # --- listeners ---------------------------------------------------------------------------
    async def _sync_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        wanted = {(vip.name, ep.host, ep.port): vip for vip in self.config.vips.values()
                  for ep in vip.listen}
        for key in [k for k in self._servers if k not in wanted]:
            server = self._servers.pop(key)
            server.close()
            self.log.info("stopped listening " + fmt(vip=key[0], address=_addr(key[1], key[2])))
        for key, vip in wanted.items():
            if key in self._servers:
                continue
            name, host, port = key
            factory = lambda n=name: self._new_session(n)  # noqa: E731
            sock = self._inherited.pop(key, None)
            if sock is not None:
                server = await loop.create_server(factory, sock=sock, backlog=1024)
            else:
                # A worker binds new addresses itself, beside its siblings (SO_REUSEPORT).
                server = await loop.create_server(factory, host, port, reuse_address=True,
                                                  reuse_port=self.worker is not None, backlog=1024)
            self._servers[key] = server
            for sock in server.sockets:
                bound = sock.getsockname()
                self.bound.setdefault(name, []).append((bound[0], bound[1]))
                if self.worker is None:     # the supervisor says it once for all workers
                    self.log.info("listening " + fmt(vip=name, address=_addr(bound[0], bound[1])))
        self._prepared = {}             # our own addresses may have changed
        self.log.flush()

    def _new_session(self, vip_name: str) -> Session:
        vip = self.config.vips.get(vip_name)
        if vip is None:       # removed by a reload while a connection was being accepted
            vip = next(iter(self.config.vips.values()))
        return Session(self, vip)

    # --- run and stop ------------------------------------------------------------------------
    async def start(self) -> None:
        # A worker takes the supervisor's states before its first session: a held pool stays held.
        self.apply_control(ack=False)
        await self._sync_listeners()
        if self.config.admin is not None and self.worker is None:
            from ..admin import AdminAccess, start_admin
            self._admin_access = AdminAccess(self.config.admin)
            self._admin = await start_admin(self, self.config.admin.listen.host,
                                            self.config.admin.listen.port, self._admin_access)
        self._sweeper = asyncio.ensure_future(self._sweep())
        self._start_queue()
        if self.worker is None:
            self.monitor = Monitor(next(iter(self.config.vips.values())).hostname)
            self.monitor.sync(self.pools)
        self.log.flush()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = time.monotonic()
            for session in list(self.sessions):
                session.check_timeouts(now)
            for pool in self.pools.values():
                pool.expire_idle()
            for limiter in self._limiters.values():
                limiter.expire(now)
            if self.worker is not None:
                self.metrics.snapshot_pools(self.pools.values())
                self._write_counts()
                if os.getppid() != self._parent:
                    # The supervisor is gone (even SIGKILL): a worker never outlives it.
                    self.log.warning("supervisor gone, stopping")
                    self.request_stop()

    def request_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._stop_requested.set()
        self.log.info("stopping " + fmt(sessions=len(self.sessions),
                                        grace_seconds=self.config.grace_seconds))
        for server in self._servers.values():
            server.close()
        for session in list(self.sessions):
            session.stop_if_idle()
        if not self.sessions:
            self._stop.set()

    async def run(self) -> None:
        """Run until stopped by a signal; then drain and clean up."""
        loop = asyncio.get_running_loop()
        # Handlers before the listeners: once "listening" is logged, a signal must not find the
        # default action (which would kill the daemon on SIGHUP).
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        await self.start()
        if self.worker is not None and self.run_dir is not None:
            # The handler first, then the first read: a change published in between is not missed.
            loop.add_signal_handler(signal.SIGUSR1, self.apply_control)
            self.apply_control()
        try:
            await self._stop_requested.wait()
            await self.drain()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            await self.close()

    async def drain(self) -> None:
        try:
            async with asyncio.timeout(self.config.grace_seconds):
                await self._stop.wait()
        except TimeoutError:
            self.log.warning("grace period over " + fmt(sessions=len(self.sessions)))
            for session in list(self.sessions):
                session.say_and_close(replies.SHUTTING_DOWN, "KD")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        sweeper = getattr(self, "_sweeper", None)
        if sweeper is not None:
            sweeper.cancel()
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        if self.monitor is not None:
            self.monitor.close()
        if self.queue is not None:
            await self.queue.close()
        for pool in self.pools.values():
            pool.close()
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        await asyncio.sleep(0)
        self.log.info("stopped")
        self.log.flush()


def _dns_facts(config: Config, metrics: Metrics) -> DnsFacts | None:
    """DNS for the early checks, only from ``nameservers``: vipd never guesses a resolver."""
    if not config.nameservers:
        return None
    return DnsFacts([str(ep) for ep in config.nameservers],
                    observe=lambda zone, seconds: metrics.dnsbl_duration.labels(zone).observe(seconds))


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

