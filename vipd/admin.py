"""The admin listener: Prometheus ``/metrics`` and a plain-text status at ``/`` (aiohttp).

Bound to loopback by default. The API and the live status page for operators grow here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from .net.daemon import Daemon

__all__ = ["start_admin", "status_text"]


def status_text(daemon: Daemon) -> str:
    lines = []
    for name, vip in daemon.config.vips.items():
        addrs = " ".join(f"{h}:{p}" for h, p in daemon.bound.get(name, []))
        lines.append(f"vip {name} listen={addrs} sessions={daemon.per_vip.get(name, 0)} "
                     f"default_pool={vip.default_pool}")
    for pool in daemon.pools.values():
        stats = pool.balancer.statistics()
        lines.append(f"pool {stats.name} balance={stats.algorithm}")
        for s in stats.servers:
            lines.append(f"  server {s.name} address={s.address} weight={s.weight} "
                         f"backup={str(s.backup).lower()} usable={str(s.usable).lower()} "
                         f"active={s.active} selected={s.selected} idle={pool.idle_count(s.name)}")
    return "\n".join(lines) + "\n"


async def start_admin(daemon: Daemon, host: str, port: int) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(daemon.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(_: web.Request) -> web.Response:
        return web.Response(text=status_text(daemon))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", status)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    for sock in (site._server.sockets if site._server else []):  # type: ignore[union-attr]
        bound = sock.getsockname()
        daemon.bound.setdefault("admin", []).append((bound[0], bound[1]))
        daemon.log.info(f"admin listening address={bound[0]}:{bound[1]}")
    return runner
