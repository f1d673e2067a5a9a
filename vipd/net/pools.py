"""A pool at run time: the pure balancer, each server's idle connections, and passive failure marks.

Rules: the balancer (vipd.balance) decides; this module only opens and hands out connections.
A server whose fresh connection fails is left out for ``FAILURE_HOLDOFF_SECONDS`` (a passive check;
the health issue brings active checks). A failed *reused* connection says little about the server
(it may just have closed an idle connection), so it does not mark the server.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..balance import Backend, Pool
from ..config import PoolConfig
from ..errors import BackendError
from .upstream import BackendConnection, ConnectionPool, Timeouts, open_connection

__all__ = ["PoolRuntime", "Lease", "FAILURE_HOLDOFF_SECONDS"]

FAILURE_HOLDOFF_SECONDS = 2.0


@dataclass(slots=True)
class Lease:
    """A connection handed to one transaction, with the server it belongs to."""

    backend: Backend
    conn: BackendConnection
    reused: bool
    pool_identity: str = "xclient"


def _timeouts(cfg: PoolConfig) -> Timeouts:
    return Timeouts(cfg.connect_timeout_seconds, cfg.greeting_timeout_seconds,
                    cfg.command_timeout_seconds, cfg.data_init_timeout_seconds,
                    cfg.data_block_timeout_seconds, cfg.data_done_timeout_seconds)


def _specs(cfg: PoolConfig) -> list[tuple[str, str, int, bool, int | None]]:
    return [(s.name, str(s.endpoint), s.weight, s.backup, s.max_sessions) for s in cfg.servers]


class PoolRuntime:
    """One configured pool and the live state behind it; survives config reloads."""

    def __init__(self, cfg: PoolConfig, on_event=None) -> None:
        self.cfg = cfg
        self.timeouts = _timeouts(cfg)
        self.balancer = Pool.from_specs(cfg.name, cfg.balance, _specs(cfg))
        self._conns: dict[str, ConnectionPool] = {}
        self._endpoints = {s.name: s.endpoint for s in cfg.servers}
        self._holdoff: dict[str, asyncio.TimerHandle] = {}
        self._on_event = on_event or (lambda *a: None)
        self._sync_conn_pools()

    @property
    def name(self) -> str:
        return self.cfg.name

    def update(self, cfg: PoolConfig) -> None:
        """Apply a reloaded config: kept servers keep their counters and idle connections."""
        self.cfg = cfg
        self.timeouts = _timeouts(cfg)
        self.balancer.update(_specs(cfg), cfg.balance)
        self._endpoints = {s.name: s.endpoint for s in cfg.servers}
        self._sync_conn_pools()

    def _sync_conn_pools(self) -> None:
        cfg = self.cfg
        for name in list(self._conns):
            if name not in self._endpoints:
                self._conns.pop(name).close_all()
        for name in self._endpoints:
            pool = self._conns.get(name)
            if pool is None:
                self._conns[name] = ConnectionPool(cfg.max_idle_per_server, cfg.idle_timeout_seconds,
                                                   cfg.max_transactions_per_connection)
            else:
                pool.max_idle = cfg.max_idle_per_server
                pool.idle_timeout = cfg.idle_timeout_seconds
                pool.max_transactions = cfg.max_transactions_per_connection

    async def lease(self, client_ip: str, helo_name: str, exclude: set[str],
                    first: Backend | None = None) -> Lease | None:
        """A greeted connection to a server the balancer picks (``first``, if already picked); None
        when no server can be reached. Every server tried and failed is added to ``exclude``.
        """
        while True:
            backend, first = first or self.balancer.pick(client_ip, exclude), None
            if backend is None:
                return None
            conns = self._conns.get(backend.name)
            endpoint = self._endpoints.get(backend.name)
            if conns is None or endpoint is None:
                exclude.add(backend.name)
                continue
            conn = conns.take()
            if conn is not None:
                self.balancer.acquire(backend)
                return Lease(backend, conn, True, self.cfg.identity)
            try:
                conn = await open_connection(endpoint.host, endpoint.port, server_name=backend.name,
                                             helo_name=self.helo(helo_name), timeouts=self.timeouts)
            except BackendError as exc:
                self.mark_failed(backend, exc)
                exclude.add(backend.name)
                continue
            self.balancer.acquire(backend)
            return Lease(backend, conn, False, self.cfg.identity)

    def helo(self, vip_hostname: str) -> str:
        """Our EHLO name to these backends: the pool's ``helo_name``, else the VIP's hostname."""
        return self.cfg.helo_name or vip_hostname

    def lease_idle(self, client_ip: str, exclude: set[str]) -> tuple[Backend | None, Lease | None]:
        """Without waiting: the server the balancer picks, and an idle connection to it if one is kept.

        Without an idle connection, pass the server to ``lease(first=...)``: picking again would
        advance the balancer twice for one transaction.
        """
        backend = self.balancer.pick(client_ip, exclude)
        if backend is None:
            return None, None
        conns = self._conns.get(backend.name)
        conn = conns.take() if conns is not None else None
        if conn is None:
            return backend, None
        self.balancer.acquire(backend)
        return backend, Lease(backend, conn, True, self.cfg.identity)

    def give_back(self, lease: Lease, *, reusable: bool) -> None:
        """End a transaction's use of a lease; a clean connection goes back to the idle set."""
        self.balancer.release(lease.backend)
        conns = self._conns.get(lease.backend.name)
        if reusable and conns is not None and lease.conn.alive:
            conns.give_back(lease.conn)
        else:
            lease.conn.close()

    def fail(self, lease: Lease, exc: Exception) -> None:
        """A leased connection failed mid-transaction."""
        self.balancer.release(lease.backend)
        lease.conn.close()
        if not lease.reused:
            self.mark_failed(lease.backend, exc)

    def mark_failed(self, backend: Backend, exc: Exception) -> None:
        if backend.usable:
            self._on_event("down", self.name, backend.name, str(exc))
        backend.usable = False
        old = self._holdoff.pop(backend.name, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._holdoff[backend.name] = loop.call_later(FAILURE_HOLDOFF_SECONDS, self._restore, backend)
        # Its idle connections are suspect too.
        conns = self._conns.get(backend.name)
        if conns is not None:
            conns.close_all()

    def _restore(self, backend: Backend) -> None:
        self._holdoff.pop(backend.name, None)
        backend.usable = True

    def expire_idle(self) -> None:
        for conns in self._conns.values():
            conns.expire()

    def idle_count(self, name: str) -> int:
        conns = self._conns.get(name)
        return conns.idle if conns else 0

    def close(self) -> None:
        for handle in self._holdoff.values():
            handle.cancel()
        self._holdoff.clear()
        for conns in self._conns.values():
            conns.close_all()
