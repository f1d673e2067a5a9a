"""The admin listener (aiohttp): the HTTP API that vipctl speaks, the live status page and /metrics.

Routes:
    GET  /                                      the status page (static; it polls api/status)
    GET  /api/status                            VIPs, pools and servers (vipd.status)
    POST /api/pools/{pool}                      {"held": true | false}: the shut-off valve
    POST /api/pools/{pool}/servers/{server}     {"admin": "ready" | "drain" | "maint"} and/or
                                                {"weight": 0..256 | null (back to the configured one)}
    GET  /api/queue[?pool=P]                    the failover queue, like mailq
    GET  /api/queue/{id}                        one queued message, with its headers
    POST /api/queue/flush                       {"pool": P | null}: try now
    POST /api/queue/{id}                        {"action": "hold" | "release" | "delete" | "bounce"}
    GET  /metrics                               Prometheus text

When a token is configured every route but the page itself (which holds no data) needs
``Authorization: Bearer TOKEN``. Every change is logged with the address that asked for it. What the
routes act on is a ``Fleet``: the daemon itself, or the supervisor of several workers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import operator_state
from .balance import ADMIN_STATES, MAX_WEIGHT
from .log import LogBuffer, fmt
from .status import pool_document, server_document, status_document

if TYPE_CHECKING:
    from .config import AdminConfig
    from .net.daemon import Daemon
    from .net.pools import PoolRuntime
    from .spool.runner import QueueRunner

QUEUE_ACTIONS = frozenset({"hold", "release", "delete", "bounce"})

__all__ = ["AdminAccess", "DaemonFleet", "Fleet", "FleetError", "apply_pool", "apply_server", "start_admin"]

MAX_BODY = 4096


class AdminAccess:
    """The admin listener's bearer token, which a reload may change.

    The listener itself stays where it was bound until a restart, so a reload that moves it or
    removes ``[admin]`` changes nothing here (a token must not fall off a listener that is still
    open); it is logged instead."""

    def __init__(self, admin: AdminConfig) -> None:
        self.listen = admin.listen
        self.token = admin.token

    def reload(self, admin: AdminConfig | None, log: LogBuffer) -> None:
        if admin is None or admin.listen != self.listen:
            log.warning("admin listener kept " + fmt(address=str(self.listen), reason="a restart moves or removes "
                                                     "it; its token stays as it was"))
        elif admin.token != self.token:
            self.token = admin.token
            log.info("admin token " + fmt(action="changed" if admin.token else "removed"))


class FleetError(Exception):
    """A request the fleet cannot carry out; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Fleet(Protocol):
    log: LogBuffer

    def status(self) -> dict[str, Any]: ...
    async def set_pool(self, pool: str, held: bool, who: str) -> dict[str, Any]: ...
    async def set_server(self, pool: str, server: str, changes: dict[str, Any], who: str) -> dict[str, Any]: ...
    def metrics(self) -> bytes: ...
    def queue_runner(self) -> QueueRunner | None: ...
    async def queue_flush(self, pool: str | None, who: str) -> int: ...


def check_server_changes(body: object) -> dict[str, Any]:
    """The validated changes of a server request, or FleetError(400)."""
    if not isinstance(body, dict) or not body or set(body) - {"admin", "weight"}:
        raise FleetError(400, 'expected a JSON object with "admin" and/or "weight"')
    if "admin" in body and body["admin"] not in ADMIN_STATES:
        raise FleetError(400, f"admin must be one of {', '.join(sorted(ADMIN_STATES))}, got {body['admin']!r}")
    weight = body.get("weight")
    if "weight" in body and weight is not None and (
            not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT):
        raise FleetError(400, f"weight must be an integer 0..{MAX_WEIGHT} or null, got {weight!r}")
    return dict(body)


def find_pool(pools: dict[str, PoolRuntime], name: str) -> PoolRuntime:
    pool = pools.get(name)
    if pool is None:
        raise FleetError(404, f"no pool {name!r} (pools: {', '.join(pools) or 'none'})")
    return pool


def apply_server(pools: dict[str, PoolRuntime], pool_name: str, server: str, changes: dict[str, Any],
                 who: str) -> PoolRuntime:
    """Carry out a validated server change on live pools (the daemon's, or the supervisor's copy)."""
    pool = find_pool(pools, pool_name)
    try:
        if "admin" in changes:
            pool.set_admin(server, changes["admin"], who)
        if "weight" in changes:
            pool.set_weight(server, changes["weight"], who)
    except KeyError:
        names = ", ".join(b.name for b in pool.balancer.backends)
        raise FleetError(404, f"no server {server!r} in pool {pool_name!r} (servers: {names})") from None
    return pool


def apply_pool(pools: dict[str, PoolRuntime], pool_name: str, held: object) -> PoolRuntime:
    if not isinstance(held, bool):
        raise FleetError(400, f'expected {{"held": true | false}}, got held={held!r}')
    pool = find_pool(pools, pool_name)
    pool.set_held(held)
    return pool


def log_change(log: LogBuffer, who: str, pool: str, server: str | None = None, **changes: Any) -> None:
    shown = {k: ("config" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
             for k, v in changes.items()}
    target = {"pool": pool} if server is None else {"pool": pool, "server": server}
    log.info("admin change " + fmt(**target, **shown, by=who))
    log.flush()


def log_queue_flush(log: LogBuffer, who: str, pool: str | None, count: int | None) -> None:
    log.info("admin queue " + fmt(action="flush", pool=pool or "all", messages=count, by=who))
    log.flush()


class DaemonFleet:
    """A lone daemon (workers = 1): the API acts on its own pools."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.log = daemon.log
        self._saving = asyncio.Lock()

    def status(self) -> dict[str, Any]:
        d = self.daemon
        return status_document(hostname=_hostname(d.config), started=d.started, workers=1,
                               vips=d.config.vips.values(), bound=d.bound, sessions=d.per_vip,
                               pools=d.pools.values())

    async def set_pool(self, pool: str, held: bool, who: str) -> dict[str, Any]:
        runtime = apply_pool(self.daemon.pools, pool, held)
        log_change(self.log, who, pool, held=held)
        await operator_state.keep(self.daemon.config.state_file, self.daemon.pools, self.log, self._saving)
        return pool_document(runtime)

    async def set_server(self, pool: str, server: str, changes: dict[str, Any], who: str) -> dict[str, Any]:
        runtime = apply_server(self.daemon.pools, pool, server, changes, who)
        log_change(self.log, who, pool, server, **changes)
        await operator_state.keep(self.daemon.config.state_file, self.daemon.pools, self.log, self._saving)
        return server_document(runtime, server)

    def metrics(self) -> bytes:
        return generate_latest(self.daemon.metrics.registry)

    def queue_runner(self) -> QueueRunner | None:
        return self.daemon.queue

    async def queue_flush(self, pool: str | None, who: str) -> int:
        runner = _runner(self)
        count = runner.flush(pool)
        log_queue_flush(self.log, who, pool, count)
        return count


def _runner(fleet: Fleet) -> QueueRunner:
    runner = fleet.queue_runner()
    if runner is None:
        raise FleetError(404, "no failover queue: spool_dir is not set in the configuration")
    return runner


def _hostname(config) -> str:
    return next(iter(config.vips.values())).hostname


def make_app(fleet: Fleet, access: AdminAccess) -> web.Application:
    page = (resources.files("vipd") / "status_page.html").read_bytes()

    @web.middleware
    async def guard(request: web.Request, handler):
        token = access.token
        if token is not None and request.path != "/":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                fleet.log.warning("admin refused " + fmt(path=request.path, by=_who(request),
                                                         reason="missing or wrong token"))
                fleet.log.flush()
                return _json({"error": "a valid bearer token is required"}, 401,
                             {"WWW-Authenticate": 'Bearer realm="vipd"'})
        try:
            return await handler(request)
        except FleetError as exc:
            return _json({"error": str(exc)}, exc.status)

    async def index(_: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def status(_: web.Request) -> web.Response:
        return _json(fleet.status())

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=fleet.metrics(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def pool(request: web.Request) -> web.Response:
        body = await _body(request)
        if not isinstance(body, dict) or set(body) != {"held"}:
            raise FleetError(400, 'expected {"held": true | false}')
        return _json(await fleet.set_pool(request.match_info["pool"], body["held"], _who(request)))

    async def server(request: web.Request) -> web.Response:
        changes = check_server_changes(await _body(request))
        info = request.match_info
        return _json(await fleet.set_server(info["pool"], info["server"], changes, _who(request)))

    async def queue_list(request: web.Request) -> web.Response:
        messages = _runner(fleet).listing(request.query.get("pool"))
        return _json({"count": len(messages), "bytes": sum(m["size"] for m in messages), "messages": messages})

    async def queue_show(request: web.Request) -> web.Response:
        try:
            return _json(_runner(fleet).show(request.match_info["qid"]))
        except KeyError:
            raise FleetError(404, f"no queued message {request.match_info['qid']!r}") from None

    async def queue_flush(request: web.Request) -> web.Response:
        body = await _body(request)
        pool = body.get("pool") if isinstance(body, dict) else None
        if pool is not None and not isinstance(pool, str):
            raise FleetError(400, 'expected {"pool": NAME} or {"pool": null}')
        return _json({"flushed": await fleet.queue_flush(pool, _who(request))})

    async def queue_operate(request: web.Request) -> web.Response:
        body = await _body(request)
        action = body.get("action") if isinstance(body, dict) else None
        if action not in QUEUE_ACTIONS:
            raise FleetError(400, f"action must be one of {', '.join(sorted(QUEUE_ACTIONS))}, got {action!r}")
        qid = request.match_info["qid"]
        try:
            result = await _runner(fleet).operate(qid, action)
        except KeyError:
            raise FleetError(404, f"no queued message {qid!r}") from None
        except TimeoutError as exc:
            raise FleetError(409, str(exc)) from None
        fleet.log.info("admin queue " + fmt(id=qid, action=action, result=result, by=_who(request)))
        if action == "release":
            await fleet.queue_flush(None, _who(request))
        return _json({"id": qid, "result": result})

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app.router.add_get("/", index)
    app.router.add_get("/api/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/api/pools/{pool}", pool)
    app.router.add_post("/api/pools/{pool}/servers/{server}", server)
    app.router.add_get("/api/queue", queue_list)
    app.router.add_post("/api/queue/flush", queue_flush)
    app.router.add_get("/api/queue/{qid}", queue_show)
    app.router.add_post("/api/queue/{qid}", queue_operate)
    return app


async def _body(request: web.Request) -> object:
    try:
        return json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise FleetError(400, f"the body is not JSON: {exc}") from None


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(data, indent=1), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store", **(headers or {})})


def _who(request: web.Request) -> str:
    return request.remote or "unknown"


async def serve(fleet: Fleet, host: str, port: int, access: AdminAccess) -> tuple[web.AppRunner, list]:
    """Start the admin listener; the runner (to clean up) and the bound (host, port) pairs."""
    runner = web.AppRunner(make_app(fleet, access), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = [sock.getsockname()[:2] for sock in (site._server.sockets if site._server else [])]  # type: ignore[union-attr]
    for h, p in bound:
        fleet.log.info(f"admin listening address={h}:{p}")
    return runner, bound


async def start_admin(daemon: Daemon, host: str, port: int, access: AdminAccess) -> web.AppRunner:
    runner, bound = await serve(DaemonFleet(daemon), host, port, access)
    daemon.bound.setdefault("admin", []).extend(bound)
    return runner
