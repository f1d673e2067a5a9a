"""Pure backend selection: pools of servers and the algorithms that pick among them."""

from __future__ import annotations

from vipd.balance.pool import (
    ADMIN_STATES,
    ALGORITHMS,
    MAX_WEIGHT,
    Algorithm,
    Backend,
    Pool,
    PoolStatistics,
    ServerSpec,
    ServerStatistics,
)

__all__ = [
    "ADMIN_STATES",
    "ALGORITHMS",
    "MAX_WEIGHT",
    "Algorithm",
    "Backend",
    "Pool",
    "PoolStatistics",
    "ServerSpec",
    "ServerStatistics",
]
