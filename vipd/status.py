"""The status document: VIPs, pools and servers as plain data, for the admin API, the page and vipctl.

One shape for everyone (docs/admin.md lists its fields); built from live PoolRuntime objects, with
per-server counters optionally taken from elsewhere (the supervisor adds up its workers').
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any

from .config import VipConfig
from .net.pools import PoolRuntime

__all__ = ["Counts", "pool_document", "server_document", "status_document", "version"]

# Per server: transactions in flight, times picked, idle connections.
Counts = Callable[[str, str], tuple[int, int, int]]


def version() -> str:
    try:
        return metadata.version("vipd")
    except metadata.PackageNotFoundError:
        return "unknown"


def status_document(*, hostname: str, started: float, workers: int, vips: Iterable[VipConfig],
                    bound: Mapping[str, list[tuple[str, int]]], sessions: Mapping[str, int],
                    pools: Iterable[PoolRuntime], counts: Counts | None = None) -> dict[str, Any]:
    return {
        "hostname": hostname,
        "version": version(),
        "uptime_seconds": round(time.time() - started, 3),
        "workers": workers,
        "vips": [{"name": v.name, "listen": [_addr(h, p) for h, p in bound.get(v.name, [])],
                  "sessions": sessions.get(v.name, 0), "max_sessions": v.max_sessions,
                  "default_pool": v.default_pool} for v in vips],
        "pools": [pool_document(p, counts) for p in pools],
    }


def pool_document(pool: PoolRuntime, counts: Counts | None = None) -> dict[str, Any]:
    stats = pool.balancer.statistics()
    held_for = None if pool.held_since is None else round(time.monotonic() - pool.held_since, 3)
    return {
        "name": pool.name,
        "balance": stats.algorithm,
        "held": stats.held,
        "held_seconds": held_for,
        "usable": sum(1 for s in stats.servers if s.usable and s.effective_weight > 0),
        "checks": {"smtp": pool.cfg.health.smtp, "agent_port": pool.cfg.health.agent_port,
                   "interval_seconds": pool.cfg.health.interval_seconds,
                   "rise": pool.cfg.health.rise, "fall": pool.cfg.health.fall},
        "servers": [server_document(pool, s.name, counts) for s in stats.servers],
    }


def server_document(pool: PoolRuntime, name: str, counts: Counts | None = None) -> dict[str, Any]:
    b = pool.balancer.backend(name)
    watch = pool.watch.get(name)
    now = time.monotonic()
    active, selected, idle = counts(pool.name, name) if counts else (b.active, b.selected,
                                                                   pool.idle_count(name))
    check = None
    if watch is not None and watch.last_check is not None and watch.last_check_at is not None:
        r = watch.last_check
        check = {"ok": r.ok, "detail": r.detail, "duration_seconds": round(r.duration_seconds, 6),
                 "age_seconds": round(now - watch.last_check_at, 3)}
    if not pool.cfg.health.smtp:
        health = "down" if b.ejected else "unchecked"
    else:
        health = "up" if b.healthy and not b.ejected else "down"
    return {
        "name": b.name,
        "address": b.address,
        "backup": b.backup,
        "state": b.state,
        "admin": b.admin,
        "health": health,
        "ejected": b.ejected,
        "held_off": b.held_off,
        "agent": watch.agent_line if watch is not None else None,
        "agent_state": "down" if b.agent_down else b.agent,
        "agent_percent": b.agent_percent,
        "ramp_percent": b.ramp_percent,
        "weight": b.current_weight,
        "configured_weight": b.weight,
        "effective_weight": round(b.current_weight * b.agent_percent * b.ramp_percent / 10000, 4),
        "max_sessions": b.max_sessions,
        "active": active,
        "selected": selected,
        "idle": idle,
        "failures": watch.failures if watch is not None else 0,
        "check": check,
        "changed_seconds": round(now - watch.changed_at, 3) if watch is not None else None,
    }


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
