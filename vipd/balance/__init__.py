"""Pure backend selection: pools of servers and the algorithms that pick among them."""

from __future__ import annotations

from vipd.balance.pool import (
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
    "ALGORITHMS",
    "MAX_WEIGHT",
    "Algorithm",
    "Backend",
    "Pool",
    "PoolStatistics",
    "ServerSpec",
    "ServerStatistics",
]
