"""Prometheus metrics: every name vipd exports is defined here (STYLE.md section 8).

Namespace ``vipd_``, base units, ``_total`` on counters, low-cardinality labels only (listener, pool,
server, code, outcome, kind): never queue ids, client addresses or mail addresses. Per-server gauges
and counters are read from the balancer's ``statistics()`` at scrape time by a custom collector, so
the per-message path only touches the counters that must be counted as things happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
_SESSION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


STATES = ("up", "drain", "down", "maint")
_HELP = {
    "active": "Transactions in flight on a server",
    "selected": "Times the balancer picked a server",
    "up": "1 if the server may take transactions",
    "state": "1 for the server's current state (up, drain, down, maint), 0 for the others",
    "weight": "The server's weight (the operator's runtime weight, else the configured one)",
    "effective": "The weight the balancer uses now: weight x agent percentage x slow-start ramp",
    "idle": "Idle connections kept for reuse",
    "held": "1 while an operator holds the pool (nothing is sent to it)",
}


def _server_values(pool: object) -> Iterable[tuple[list[str], object, int]]:
    stats = pool.balancer.statistics()  # type: ignore[attr-defined]
    for s in stats.servers:
        yield [stats.name, s.name], s, pool.idle_count(s.name)  # type: ignore[attr-defined]


class _PoolCollector(Collector):
    """Per-server state, read from the live pools at scrape time: the counts (transactions, picks,
    idle connections) and the states; a supervisor of workers exports only the states, its workers
    only the counts."""

    def __init__(self, pools: Callable[[], Iterable[object]], counts: bool = True, states: bool = True) -> None:
        self._pools = pools
        self._counts, self._states = counts, states

    def collect(self):  # type: ignore[override]
        families = list(self._families())
        wanted = ({"vipd_server_active_transactions", "vipd_server_selected", "vipd_backend_idle_connections"}
                  if self._counts else set())
        if self._states:
            wanted |= {"vipd_server_up", "vipd_server_state", "vipd_server_weight", "vipd_server_effective_weight",
                       "vipd_pool_held"}
        yield from (f for f in families if f.name in wanted)

    def _families(self):
        labels = ["pool", "server"]
        active = GaugeMetricFamily("vipd_server_active_transactions", _HELP["active"], labels=labels)
        selected = CounterMetricFamily("vipd_server_selected", _HELP["selected"], labels=labels)
        up = GaugeMetricFamily("vipd_server_up", _HELP["up"], labels=labels)
        state = GaugeMetricFamily("vipd_server_state", _HELP["state"], labels=[*labels, "state"])
        weight = GaugeMetricFamily("vipd_server_weight", _HELP["weight"], labels=labels)
        effective = GaugeMetricFamily("vipd_server_effective_weight", _HELP["effective"], labels=labels)
        idle = GaugeMetricFamily("vipd_backend_idle_connections", _HELP["idle"], labels=labels)
        held = GaugeMetricFamily("vipd_pool_held", _HELP["held"], labels=["pool"])
        for pool in self._pools():
            held.add_metric([pool.name], 1 if pool.balancer.held else 0)  # type: ignore[attr-defined]
            for key, s, n_idle in _server_values(pool):
                active.add_metric(key, s.active)  # type: ignore[attr-defined]
                selected.add_metric(key, s.selected)  # type: ignore[attr-defined]
                up.add_metric(key, 1 if s.usable else 0)  # type: ignore[attr-defined]
                for name in STATES:
                    state.add_metric([*key, name], 1 if s.state == name else 0)  # type: ignore[attr-defined]
                weight.add_metric(key, s.current_weight)  # type: ignore[attr-defined]
                effective.add_metric(key, s.effective_weight)  # type: ignore[attr-defined]
                idle.add_metric(key, n_idle)
        yield from (active, selected, up, state, weight, effective, idle, held)


class SpoolCollector(Collector):
    """``vipd_spool_messages``, ``vipd_spool_bytes``, ``vipd_spool_oldest_message_age_seconds``."""

    def __init__(self, spool: object) -> None:
        self._spool = spool

    def collect(self):  # type: ignore[override]
        import time
        stats = self._spool.stats()  # type: ignore[attr-defined]
        yield GaugeMetricFamily("vipd_spool_messages", "Messages in the failover queue", value=stats.messages)
        yield GaugeMetricFamily("vipd_spool_bytes", "Bytes in the failover queue", value=stats.bytes)
        age = 0.0 if stats.oldest_arrival is None else max(0.0, time.time() - stats.oldest_arrival)
        yield GaugeMetricFamily("vipd_spool_oldest_message_age_seconds", "Age of the oldest queued message",
                                value=age)


class HealthMetrics:
    """What the active checks do. Kept apart because with several workers the supervisor runs the
    checks and exports these, and the workers must not export them too."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = self.registry = registry
        self.server_transitions = Counter("vipd_server_transitions", "Server state changes, by new state",
                                          ["pool", "server", "state"], registry=r)
        self.checks = Counter("vipd_health_checks", "Active checks run", ["pool", "kind", "result"],
                              registry=r)
        self.check_duration = Histogram("vipd_health_check_duration_seconds", "Active check duration",
                                        ["pool", "kind"], buckets=_LATENCY_BUCKETS, registry=r)

    def watch_states(self, pools: Callable[[], Iterable[object]]) -> None:
        """Export server states read from ``pools`` at scrape time (not their counts)."""
        self.registry.register(_PoolCollector(pools, counts=False))


class Metrics:
    """The daemon's metrics, in their own registry (tests make as many as they like).

    ``health``: False in a worker of several, whose supervisor runs the checks and exports them.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, health: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.health = HealthMetrics(r) if health else None
        self.sessions = Counter("vipd_sessions", "Client sessions accepted", ["listener"], registry=r)
        self.sessions_active = Gauge("vipd_sessions_active", "Client sessions open", ["listener"],
                                     registry=r, multiprocess_mode="livesum")
        self.sessions_refused = Counter("vipd_sessions_refused", "Connections refused at connect",
                                        ["listener", "reason"], registry=r)
        self.session_duration = Histogram("vipd_session_duration_seconds", "Client session duration",
                                          buckets=_SESSION_BUCKETS, registry=r)
        self.replies = Counter("vipd_replies", "Replies sent to clients", ["listener", "code"],
                               registry=r)
        self.protocol_errors = Counter("vipd_protocol_errors", "Client protocol violations",
                                       ["kind"], registry=r)
        self.messages = Counter("vipd_messages", "Client transactions that reached DATA's end",
                                ["outcome"], registry=r)
        self.message_size = Histogram("vipd_message_size_bytes", "Size of relayed messages",
                                      buckets=_SIZE_BUCKETS, registry=r)
        self.transaction_duration = Histogram(
            "vipd_transaction_duration_seconds", "From MAIL to the final reply after DATA",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.backend_delivery = Histogram(
            "vipd_backend_delivery_duration_seconds", "From writing the body to a backend's final reply",
            ["pool", "server"], buckets=_LATENCY_BUCKETS, registry=r)
        self.backend_failures = Counter("vipd_backend_failures", "Backend connections that failed",
                                        ["pool", "server"], registry=r)
        self.policy_verdicts = Counter("vipd_policy_verdicts", "Early-check decisions",
                                       ["check", "verdict"], registry=r)
        self.dnsbl_duration = Histogram("vipd_dnsbl_lookup_duration_seconds", "DNSBL lookup latency",
                                        ["zone"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tls_sessions = Counter("vipd_tls_sessions", "Sessions switched to TLS by STARTTLS",
                                    ["listener", "version"], registry=r)
        self.tls_failures = Counter("vipd_tls_handshake_failures", "STARTTLS handshakes that failed",
                                    ["listener"], registry=r)
        self.config_reloads = Counter("vipd_config_reloads", "Configuration reloads", ["result"],
                                      registry=r)
        self.spool_deliveries = Counter("vipd_spool_deliveries", "Queued messages delivered", ["pool"],
                                        registry=r)
        self.spool_deferrals = Counter("vipd_spool_deferrals", "Queue delivery attempts deferred", ["pool"],
                                       registry=r)
        self.spool_bounces = Counter("vipd_spool_bounces", "Notifications queued to senders",
                                     ["kind"], registry=r)
        self.spool_write_failures = Counter("vipd_spool_write_failures",
                                            "Messages refused because the spool could not be written",
                                            registry=r)
        self._selected: Counter | None = None
        self._last_selected: dict[tuple[str, str], int] = {}
        for outcome in ("relayed", "queued", "rejected", "deferred"):
            self.messages.labels(outcome)
        for result in ("ok", "failed"):
            self.config_reloads.labels(result)

    def watch_spool(self, spool: object) -> None:
        """The queue's size, read from the spool folder at scrape time (so it counts every worker's)."""
        self.registry.register(SpoolCollector(spool))

    def watch_pools(self, pools: Callable[[], Iterable[object]]) -> None:
        """Single process: read the pools at scrape time."""
        self.registry.register(_PoolCollector(pools))

    def snapshot_pools(self, pools: Iterable[object]) -> None:
        """Several workers: copy each worker's per-server counts into metrics that add up across
        processes (the states come from the supervisor). Called once a second by each worker;
        counters advance by what was picked since the last call.
        """
        if self._selected is None:
            r = self.registry
            labels = ["pool", "server"]
            self._selected = Counter("vipd_server_selected", _HELP["selected"], labels, registry=r)
            self._active = Gauge("vipd_server_active_transactions", _HELP["active"], labels, registry=r,
                                 multiprocess_mode="livesum")
            self._idle = Gauge("vipd_backend_idle_connections", _HELP["idle"], labels, registry=r,
                               multiprocess_mode="livesum")
        for pool in pools:
            for key, s, n_idle in _server_values(pool):
                delta = s.selected - self._last_selected.get(tuple(key), 0)  # type: ignore[attr-defined]
                self._last_selected[tuple(key)] = s.selected  # type: ignore[attr-defined]
                if delta > 0:
                    self._selected.labels(*key).inc(delta)
                self._active.labels(*key).set(s.active)  # type: ignore[attr-defined]
                self._idle.labels(*key).set(n_idle)
