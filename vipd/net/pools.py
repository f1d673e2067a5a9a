"""A pool at run time: the pure balancer, each server's idle connections, and the inputs to its state.

Rules: the balancer (vipd.balance) decides; this module opens and hands out connections and keeps
each server's state inputs up to date: the operator's word, the active checks' verdict (fed by
vipd.net.monitor), the agent's report, passive failures and the slow-start ramp. Every change of a
server's state goes through ``_changed``: it is logged and counted there, a server that stops taking
transactions has its idle connections closed, and one that comes back starts its slow start.

Passive checks: a fresh connection that fails leaves the server out for ``FAILURE_HOLDOFF_SECONDS``;
``passive_failures`` consecutive failed transactions (connection lost, timeout) eject it: with active
checks it stays down until ``rise`` checks pass, without them for ``EJECT_SECONDS``. A failed
*reused* connection that was simply closed says little about the server (it may have dropped an
idle connection), so only its timeouts count.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Protocol

from health.checks import AgentReport, CheckResult
from health.state import HealthState

from ..balance import Backend, Pool
from ..config import PoolConfig
from ..errors import BackendError, BackendTimeout
from .upstream import BackendConnection, BackendTls, ConnectionPool, Timeouts, open_connection

__all__ = ["PoolRuntime", "PoolEvents", "Lease", "ServerWatch", "FAILURE_HOLDOFF_SECONDS", "EJECT_SECONDS"]

FAILURE_HOLDOFF_SECONDS = 2.0
EJECT_SECONDS = 10.0
RAMP_TICK_SECONDS = 0.5
_AGENT_ADMIN = {"ready": "up", "drain": "drain", "maint": "maint"}


class PoolEvents(Protocol):
    """Where a pool reports what happens to its servers (the daemon logs and counts it)."""

    def transition(self, pool: str, server: str, old: str, new: str, reason: str) -> None: ...
    def failure(self, pool: str, server: str, detail: str) -> None: ...
    def checked(self, pool: str, server: str, kind: str, result: CheckResult) -> None: ...


class _Quiet:
    def transition(self, pool: str, server: str, old: str, new: str, reason: str) -> None:
        pass

    def failure(self, pool: str, server: str, detail: str) -> None:
        pass

    def checked(self, pool: str, server: str, kind: str, result: CheckResult) -> None:
        pass


@dataclass(slots=True)
class Lease:
    """A connection handed to one transaction, with the server it belongs to."""

    backend: Backend
    conn: BackendConnection
    reused: bool
    pool_identity: str = "xclient"


@dataclass(slots=True)
class ServerWatch:
    """What the pool knows about one server beyond the balancer's inputs: for checks and the status."""

    health: HealthState
    checked: bool = False                    # an active check has run at least once
    last_check: CheckResult | None = None
    last_check_at: float | None = None       # monotonic
    agent_line: str | None = None
    agent_failures: int = 0
    failures: int = 0                        # consecutive failed transactions
    passes_since_eject: int = 0              # active checks passed in a row while ejected
    changed_at: float = field(default_factory=time.monotonic)
    ramp_started: float | None = None
    timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)

    def cancel(self, name: str) -> None:
        handle = self.timers.pop(name, None)
        if handle is not None:
            handle.cancel()


def _timeouts(cfg: PoolConfig) -> Timeouts:
    return Timeouts(cfg.connect_timeout_seconds, cfg.greeting_timeout_seconds,
                    cfg.command_timeout_seconds, cfg.data_init_timeout_seconds,
                    cfg.data_block_timeout_seconds, cfg.data_done_timeout_seconds)


def _specs(cfg: PoolConfig) -> list[tuple[str, str, int, bool, int | None]]:
    return [(s.name, str(s.endpoint), s.weight, s.backup, s.max_sessions) for s in cfg.servers]


def _backend_tls(cfg: PoolConfig) -> BackendTls | None:
    """The client-side TLS of a pool; TLS 1.2 at least, the certificate checked only with tls_verify."""
    if cfg.tls == "none":
        return None
    import ssl
    if cfg.tls_verify:
        ctx = ssl.create_default_context(cafile=str(cfg.tls_ca) if cfg.tls_ca else None)
    else:
        # Opportunistic encryption (RFC 7435): better than plaintext against a passive listener.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return BackendTls(ctx, cfg.tls == "required", cfg.tls_server_name)


def ramp_percent(elapsed: float, period: float) -> int:
    """Slow start: the share of its weight a server gets ``elapsed`` seconds after coming back."""
    if period <= 0 or elapsed >= period:
        return 100
    return max(1, min(100, math.ceil(100 * max(elapsed, 0.0) / period)))


class PoolRuntime:
    """One configured pool and the live state behind it; survives config reloads."""

    def __init__(self, cfg: PoolConfig, events: PoolEvents | None = None, *,
                 checks_elsewhere: bool = False) -> None:
        """``checks_elsewhere``: a worker of several, whose supervisor runs the checks and the slow
        start and publishes them (``apply_published``); passive checks stay local to each worker."""
        self.cfg = cfg
        self.checks_elsewhere = checks_elsewhere
        self.on_change: Callable[[], None] | None = None
        self.tls = _backend_tls(cfg)
        self.timeouts = _timeouts(cfg)
        self.balancer = Pool.from_specs(cfg.name, cfg.balance, _specs(cfg))
        self.events: PoolEvents = events or _Quiet()
        self._conns: dict[str, ConnectionPool] = {}
        self._endpoints = {s.name: s.endpoint for s in cfg.servers}
        self.watch: dict[str, ServerWatch] = {}
        self.held_since: float | None = None
        self._sync()

    @property
    def name(self) -> str:
        return self.cfg.name

    def update(self, cfg: PoolConfig) -> None:
        """Apply a reloaded config: kept servers keep their counters, states and idle connections."""
        self.cfg = cfg
        self.timeouts = _timeouts(cfg)
        self.tls = _backend_tls(cfg)
        self.balancer.update(_specs(cfg), cfg.balance)
        self._endpoints = {s.name: s.endpoint for s in cfg.servers}
        self._sync()

    def _sync(self) -> None:
        cfg = self.cfg
        for name in list(self._conns):
            if name not in self._endpoints:
                self._conns.pop(name).close_all()
        for name in list(self.watch):
            if name not in self._endpoints:
                for handle in self.watch.pop(name).timers.values():
                    handle.cancel()
        for name in self._endpoints:
            pool = self._conns.get(name)
            if pool is None:
                self._conns[name] = ConnectionPool(cfg.max_idle_per_server, cfg.idle_timeout_seconds,
                                                   cfg.max_transactions_per_connection)
            else:
                pool.max_idle = cfg.max_idle_per_server
                pool.idle_timeout = cfg.idle_timeout_seconds
                pool.max_transactions = cfg.max_transactions_per_connection
            watch = self.watch.get(name)
            if watch is None:
                self.watch[name] = ServerWatch(HealthState(cfg.health.rise, cfg.health.fall))
            else:
                watch.health.rise, watch.health.fall = cfg.health.rise, cfg.health.fall
        if not cfg.health.smtp and not self.checks_elsewhere:
            # Checks switched off by a reload: nothing would ever bring a checked-down server back.
            for b in self.balancer.backends:
                if not b.healthy or b.ejected and "eject" not in self.watch[b.name].timers:
                    self._set(b, "active checks off", healthy=True, ejected=False)
        agents = {s.name for s in cfg.servers if (s.agent_port or cfg.health.agent_port)}
        for b in self.balancer.backends:
            if not self.checks_elsewhere and b.name not in agents and (
                    b.agent != "up" or b.agent_down or b.agent_percent != 100):
                self._set(b, "agent off", agent="up", agent_down=False, agent_percent=100)

    # --- leasing connections -----------------------------------------------------------------
    @property
    def per_client(self) -> bool:
        """PROXY headers bind a backend connection to one client: such connections are never shared."""
        return self.cfg.identity in ("proxy-v1", "proxy-v2")

    async def lease(self, client_ip: str, helo_name: str, exclude: set[str],
                    first: Backend | None = None, preamble: bytes = b"") -> Lease | None:
        """A greeted connection to a server the balancer picks (``first``, if already picked); None
        when no server can be reached. Every server tried and failed is added to ``exclude``.
        ``preamble``: what to send on a new connection before its greeting (a PROXY header).
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
            conn = None if self.per_client else conns.take()
            if conn is not None:
                self.balancer.acquire(backend)
                return Lease(backend, conn, True, self.cfg.identity)
            try:
                conn = await open_connection(endpoint.host, endpoint.port, server_name=backend.name,
                                             helo_name=self.helo(helo_name), timeouts=self.timeouts,
                                             preamble=preamble, tls=self.tls)
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
        conn = conns.take() if conns is not None and not self.per_client else None
        if conn is None:
            return backend, None
        self.balancer.acquire(backend)
        return backend, Lease(backend, conn, True, self.cfg.identity)

    def give_back(self, lease: Lease, *, reusable: bool) -> None:
        """End a transaction's use of a lease; a clean connection goes back to the idle set.

        A clean return is also the passive checks' "it works": the failure count starts over.
        """
        backend = lease.backend
        self.balancer.release(backend)
        conns = self._conns.get(backend.name)
        if reusable and lease.conn.alive:
            watch = self.watch.get(backend.name)
            if watch is not None:
                watch.failures = 0
            if conns is not None and backend.usable and not self.per_client:
                conns.give_back(lease.conn)
                return
        lease.conn.close()

    def fail(self, lease: Lease, exc: Exception) -> None:
        """A leased connection failed mid-transaction."""
        self.balancer.release(lease.backend)
        lease.conn.close()
        if not lease.reused or isinstance(exc, BackendTimeout):
            self.mark_failed(lease.backend, exc, holdoff=not lease.reused)

    def mark_failed(self, backend: Backend, exc: Exception, *, holdoff: bool = True) -> None:
        """A passive check failed: count it, hold the server off briefly, eject it after too many."""
        self.events.failure(self.name, backend.name, str(exc))
        watch = self.watch.get(backend.name)
        if watch is None:
            return
        watch.failures += 1
        limit = self.cfg.health.passive_failures
        if limit and watch.failures >= limit and not backend.ejected:
            self._eject(backend, watch, f"{watch.failures} failures in a row, last: {exc}")
        if holdoff:
            watch.cancel("holdoff")
            self._set(backend, f"passive: {exc}", held_off=True)
            watch.timers["holdoff"] = asyncio.get_running_loop().call_later(
                FAILURE_HOLDOFF_SECONDS, self._end_holdoff, backend)
        # Its idle connections are suspect too.
        conns = self._conns.get(backend.name)
        if conns is not None:
            conns.close_all()

    def _end_holdoff(self, backend: Backend) -> None:
        watch = self.watch.get(backend.name)
        if watch is not None:
            watch.timers.pop("holdoff", None)
        self._set(backend, "hold-off over", held_off=False)

    def _eject(self, backend: Backend, watch: ServerWatch, reason: str) -> None:
        """Out until `rise` active checks in a row pass; without active checks, for EJECT_SECONDS."""
        watch.failures, watch.passes_since_eject = 0, 0
        if not self.cfg.health.smtp or self.checks_elsewhere:
            watch.cancel("eject")
            watch.timers["eject"] = asyncio.get_running_loop().call_later(
                EJECT_SECONDS, self._end_eject, backend, f"ejection over after {EJECT_SECONDS:g}s")
        self._set(backend, f"ejected: {reason}", ejected=True)

    def _end_eject(self, backend: Backend, reason: str) -> None:
        watch = self.watch.get(backend.name)
        if watch is not None:
            watch.timers.pop("eject", None)
        self._set(backend, reason, ejected=False)

    # --- active checks (fed by vipd.net.monitor) ---------------------------------------------
    def observe_check(self, name: str, result: CheckResult) -> None:
        """One SMTP check result: rise/fall decide whether the server's health flips."""
        backend, watch = self._server(name)
        if backend is None or watch is None:
            return
        watch.checked, watch.last_check, watch.last_check_at = True, result, time.monotonic()
        self.events.checked(self.name, name, "smtp", result)
        flip = watch.health.observe(result.ok)
        what = "check passed" if result.ok else "check failed"
        changes: dict[str, object] = {}
        if flip is not None or backend.healthy != watch.health.up:
            changes["healthy"] = watch.health.up
        if result.ok and watch.health.up and backend.held_off:
            # A passing check is fresher news than the failed connection behind the hold-off.
            watch.cancel("holdoff")
            changes["held_off"] = False
        if changes:
            self._set(backend, f"{what}: {result.detail}", **changes)
        if backend.ejected:
            watch.passes_since_eject = watch.passes_since_eject + 1 if result.ok else 0
            if watch.passes_since_eject >= self.cfg.health.rise:
                self._end_eject(backend, f"{what} {watch.passes_since_eject} times after ejection")

    def observe_agent(self, name: str, report: AgentReport | None, error: str = "") -> None:
        """One agent reply (None: the agent could not be reached)."""
        backend, watch = self._server(name)
        if backend is None or watch is None:
            return
        if report is None:
            watch.agent_failures += 1
            watch.agent_line = f"unreachable: {error}"
            # No news for `fall` rounds: its last opinion is stale; trust the SMTP check alone.
            if watch.agent_failures >= self.cfg.health.fall:
                self._set(backend, f"agent unreachable: {error}", agent="up", agent_down=False,
                          agent_percent=100)
            return
        watch.agent_failures, watch.agent_line = 0, report.raw.strip()[:200]
        changes: dict[str, object] = {}
        if report.admin is not None:
            changes["agent"] = _AGENT_ADMIN[report.admin]
        if report.operational is not None:
            changes["agent_down"] = report.operational != "up"
        if report.weight_percent is not None:
            changes["agent_percent"] = min(100, report.weight_percent)
        if changes:
            self._set(backend, f"agent: {watch.agent_line}", **changes)

    # --- operator ----------------------------------------------------------------------------
    def set_admin(self, name: str, admin: str, who: str) -> Backend:
        """``ready``, ``drain`` or ``maint`` from an operator; KeyError for an unknown server."""
        backend = self.balancer.backend(name)
        self._set(backend, f"operator {who}", admin=admin)
        return backend

    def set_weight(self, name: str, weight: int | None, who: str) -> Backend:
        """The operator's runtime weight (None: back to the configured one)."""
        backend = self.balancer.backend(name)
        self._set(backend, f"operator {who}", weight_override=weight)
        return backend

    def set_held(self, held: bool) -> None:
        if held != self.balancer.held:
            self.held_since = time.monotonic() if held else None
        self.balancer.held = held
        if held:
            # Nothing leaves a held pool: idle connections would only time out.
            for conns in self._conns.values():
                conns.close_all()
        self._notify()

    # --- several workers: the supervisor publishes, each worker applies -----------------------
    _PUBLISHED = ("admin", "weight_override", "healthy", "agent", "agent_down", "agent_percent", "ramp_percent")

    def published(self) -> dict[str, Any]:
        """The inputs the supervisor decides, for its workers (JSON-able)."""
        return {"held": self.balancer.held,
                "servers": {b.name: {k: getattr(b, k) for k in self._PUBLISHED} for b in self.balancer.backends}}

    def apply_published(self, doc: dict[str, Any]) -> None:
        """A worker takes the supervisor's word; its own passive marks (hold-off, ejection) stay."""
        if bool(doc.get("held")) != self.balancer.held:
            self.set_held(bool(doc.get("held")))
        for name, fields in doc.get("servers", {}).items():
            backend, _ = self._server(name)
            if backend is not None:
                self._set(backend, "supervisor", quiet=True,
                          **{k: v for k, v in fields.items() if k in self._PUBLISHED})

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # --- state changes -----------------------------------------------------------------------
    def _server(self, name: str) -> tuple[Backend | None, ServerWatch | None]:
        try:
            return self.balancer.backend(name), self.watch.get(name)
        except KeyError:
            return None, None

    def _set(self, backend: Backend, reason: str, quiet: bool = False, **changes: object) -> None:
        """Change state inputs of one server; report and act on the state change, if any.

        ``quiet``: the change was decided (and reported) elsewhere, by the supervisor of workers.
        """
        old = backend.state
        before = [getattr(backend, key) for key in changes]
        for key, value in changes.items():
            setattr(backend, key, value)
        new = backend.state
        watch = self.watch.get(backend.name)
        if new != old:
            if watch is not None:
                watch.changed_at = time.monotonic()
            if not quiet:
                self.events.transition(self.name, backend.name, old, new, reason)
            if new != "up":
                conns = self._conns.get(backend.name)
                if conns is not None:
                    conns.close_all()   # drain: current transactions finish, nothing new starts
            elif watch is not None and not self.checks_elsewhere:
                self._start_ramp(backend, watch)
        if before != list(changes.values()):
            self._notify()

    def _start_ramp(self, backend: Backend, watch: ServerWatch) -> None:
        period = self.cfg.health.slowstart_seconds
        if period <= 0:
            return
        watch.ramp_started = time.monotonic()
        backend.ramp_percent = 1
        self._notify()
        watch.cancel("ramp")
        watch.timers["ramp"] = asyncio.get_running_loop().call_later(RAMP_TICK_SECONDS, self._ramp, backend)

    def _ramp(self, backend: Backend) -> None:
        watch = self.watch.get(backend.name)
        if watch is None or watch.ramp_started is None:
            return
        watch.timers.pop("ramp", None)
        backend.ramp_percent = ramp_percent(time.monotonic() - watch.ramp_started,
                                            self.cfg.health.slowstart_seconds)
        self._notify()
        if backend.ramp_percent >= 100 or not backend.usable:
            backend.ramp_percent, watch.ramp_started = 100, None
            return
        watch.timers["ramp"] = asyncio.get_running_loop().call_later(RAMP_TICK_SECONDS, self._ramp, backend)

    # --- housekeeping ------------------------------------------------------------------------
    def expire_idle(self) -> None:
        for conns in self._conns.values():
            conns.expire()

    def idle_count(self, name: str) -> int:
        conns = self._conns.get(name)
        return conns.idle if conns else 0

    def close(self) -> None:
        for watch in self.watch.values():
            for handle in watch.timers.values():
                handle.cancel()
            watch.timers.clear()
        for conns in self._conns.values():
            conns.close_all()
