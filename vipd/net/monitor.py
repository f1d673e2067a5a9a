"""The health monitor: runs each pool's active checks (SMTP and agent) and feeds the results to it.

One task per server and kind of check. The first check of each server starts at a random point of
the first interval (at most a second in), so a pool of many servers is not probed in bursts; after that a check starts
``interval`` after the previous one started (or at once, if it took longer). The pool (PoolRuntime)
turns results into states; this module only does the I/O and the timing.
"""

from __future__ import annotations

import asyncio
import random

from health.checks import agent_check, smtp_check

from ..config import HealthConfig
from .pools import PoolRuntime

__all__ = ["Monitor"]


class Monitor:
    """The checks of every pool; ``sync`` after a reload starts, stops or restarts what changed."""

    def __init__(self, helo: str) -> None:
        self.helo = helo
        self._tasks: dict[tuple[str, str, str], tuple[asyncio.Task[None], object]] = {}

    def sync(self, pools: dict[str, PoolRuntime]) -> None:
        wanted: dict[tuple[str, str, str], object] = {}
        for pool in pools.values():
            health = pool.cfg.health
            for server in pool.cfg.servers:
                ep = server.endpoint
                if health.smtp:
                    wanted[(pool.name, server.name, "smtp")] = (ep, health, pool.cfg.helo_name)
                port = server.agent_port or health.agent_port
                if port is not None:
                    wanted[(pool.name, server.name, "agent")] = (ep, health, port)
        for key in [k for k, (_, spec) in self._tasks.items() if wanted.get(k) != spec]:
            self._tasks.pop(key)[0].cancel()
        for key, spec in wanted.items():
            if key in self._tasks:
                continue
            pool = pools[key[0]]
            if key[2] == "smtp":
                task = asyncio.ensure_future(self._smtp(pool, key[1], *spec[:2]))  # type: ignore[index]
            else:
                task = asyncio.ensure_future(self._agent(pool, key[1], *spec))  # type: ignore[misc]
            self._tasks[key] = (task, spec)

    async def _smtp(self, pool: PoolRuntime, server: str, ep, health: HealthConfig) -> None:
        helo = pool.cfg.helo_name or self.helo
        await asyncio.sleep(random.uniform(0, min(health.interval_seconds, 1.0)))
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            result = await smtp_check(ep.host, ep.port, helo=helo, timeout=health.timeout_seconds,
                                      require=health.require, preamble=_preamble(pool.cfg.identity))
            pool.observe_check(server, result)
            await asyncio.sleep(max(0.0, started + health.interval_seconds - loop.time()))

    async def _agent(self, pool: PoolRuntime, server: str, ep, health: HealthConfig, port: int) -> None:
        await asyncio.sleep(random.uniform(0, min(health.agent_interval_seconds, 1.0)))
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                report = await agent_check(ep.host, port, timeout=health.timeout_seconds)
            except (OSError, ValueError) as exc:
                pool.observe_agent(server, None, f"{type(exc).__name__}: {exc}".rstrip(": "))
            else:
                pool.observe_agent(server, report)
            await asyncio.sleep(max(0.0, started + health.agent_interval_seconds - loop.time()))

    def close(self) -> None:
        for task, _ in self._tasks.values():
            task.cancel()
        self._tasks.clear()


def _preamble(identity: str) -> bytes:
    """Checks speak like transactions: a backend that wants a PROXY header gets one (it names the
    balancer itself: v2 LOCAL, v1 UNKNOWN), or it would refuse the check."""
    if identity == "proxy-v2":
        from ..proxy import build_v2
        return build_v2(None, None)
    if identity == "proxy-v1":
        return b"PROXY UNKNOWN\r\n"
    return b""
