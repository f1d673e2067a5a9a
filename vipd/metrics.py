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


class _PoolCollector(Collector):
    """Per-server state, read from the live pools at scrape time."""

    def __init__(self, pools: Callable[[], Iterable[object]]) -> None:
        self._pools = pools

    def collect(self):  # type: ignore[override]
        active = GaugeMetricFamily("vipd_server_active_transactions",
                                   "Transactions in flight on a server", labels=["pool", "server"])
        selected = CounterMetricFamily("vipd_server_selected",
                                       "Times the balancer picked a server", labels=["pool", "server"])
        up = GaugeMetricFamily("vipd_server_up", "1 if the server may take transactions",
                               labels=["pool", "server"])
        weight = GaugeMetricFamily("vipd_server_weight", "Configured weight", labels=["pool", "server"])
        idle = GaugeMetricFamily("vipd_backend_idle_connections", "Idle connections kept for reuse",
                                 labels=["pool", "server"])
        for pool in self._pools():
            stats = pool.balancer.statistics()  # type: ignore[attr-defined]
            for s in stats.servers:
                labels = [stats.name, s.name]
                active.add_metric(labels, s.active)
                selected.add_metric(labels, s.selected)
                up.add_metric(labels, 1 if s.usable else 0)
                weight.add_metric(labels, s.weight)
                idle.add_metric(labels, pool.idle_count(s.name))  # type: ignore[attr-defined]
        yield from (active, selected, up, weight, idle)


class Metrics:
    """The daemon's metrics, in their own registry (tests make as many as they like)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
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
        self.config_reloads = Counter("vipd_config_reloads", "Configuration reloads", ["result"],
                                      registry=r)
        self._selected: Counter | None = None
        self._last_selected: dict[tuple[str, str], int] = {}
        for outcome in ("relayed", "rejected", "deferred"):
            self.messages.labels(outcome)
        for result in ("ok", "failed"):
            self.config_reloads.labels(result)

    def watch_pools(self, pools: Callable[[], Iterable[object]]) -> None:
        """Single process: read the pools at scrape time."""
        self.registry.register(_PoolCollector(pools))

    def snapshot_pools(self, pools: Iterable[object]) -> None:
        """Several workers: copy each worker's pool state into metrics that add up across processes.

        Called once a second by each worker; counters advance by what was picked since the last call.
        """
        if self._selected is None:
            r = self.registry
            labels = ["pool", "server"]
            self._selected = Counter("vipd_server_selected", "Times the balancer picked a server",
                                     labels, registry=r)
            self._active = Gauge("vipd_server_active_transactions", "Transactions in flight on a server",
                                 labels, registry=r, multiprocess_mode="livesum")
            self._up = Gauge("vipd_server_up", "1 if the server may take transactions", labels,
                             registry=r, multiprocess_mode="min")
            self._weight = Gauge("vipd_server_weight", "Configured weight", labels, registry=r,
                                 multiprocess_mode="max")
            self._idle = Gauge("vipd_backend_idle_connections", "Idle connections kept for reuse",
                               labels, registry=r, multiprocess_mode="livesum")
        for pool in pools:
            stats = pool.balancer.statistics()  # type: ignore[attr-defined]
            for s in stats.servers:
                key = (stats.name, s.name)
                delta = s.selected - self._last_selected.get(key, 0)
                self._last_selected[key] = s.selected
                if delta > 0:
                    self._selected.labels(*key).inc(delta)
                self._active.labels(*key).set(s.active)
                self._up.labels(*key).set(1 if s.usable else 0)
                self._weight.labels(*key).set(s.weight)
                self._idle.labels(*key).set(pool.idle_count(s.name))  # type: ignore[attr-defined]
