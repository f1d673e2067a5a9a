"""The queue runner: puts messages into the spool for the forwarder, and delivers them when it can.

Rules:
- ``spool`` (called by a Transaction) acknowledges nothing itself: it returns ``250 2.0.0 Ok: queued
  as ID`` only after the spool's durable write returned, and ``452 4.3.1`` when the write failed.
- A message is tried only while its pool has a usable server and is not held; a pool that comes back
  or is released is flushed at once. Between attempts a message waits ``retry_min_seconds``, doubling
  up to ``retry_max_seconds`` (with a little jitter, so a queue does not come back in one burst).
- A message leaves the spool only after a backend's 250 for every recipient it still has (recipients
  accepted are struck off; refused ones, 5xx, are bounced); otherwise it is kept: at-least-once.
- Past ``warn_seconds`` the sender gets a delay notice, past ``return_seconds`` a bounce (RFC 3464),
  both with the null sender, through the pool its address routes to (or ``bounce_pool``); a message
  from the null sender is never bounced, only logged and dropped when it expires.
- Several processes may run a runner on one spool: each delivery holds the message's lock, and every
  runner rescans the folder now and then to find what another process wrote.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import random
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..log import LogBuffer, fmt
from ..net.body import Body
from ..net.forward import ClientFacts, Part, Transaction
from ..net.pools import PoolRuntime
from ..smtp import replies
from ..smtp.commands import Address, MailFrom
from ..smtp.replies import Reply
from .store import Envelope, Spool, SpoolError, State, new_id

if TYPE_CHECKING:
    from ..config import QueueConfig

__all__ = ["QueueRunner", "address"]

RESCAN_SECONDS = 5.0
FAR = float("inf")


def address(text: str) -> Address:
    """An Address from its text form as stored in the spool."""
    local, _, domain = text.rpartition("@")
    return Address(local if domain else text, domain.lower(), text)


class QueueRunner:
    def __init__(self, spool: Spool, settings: QueueConfig, *, pools: Callable[[], dict[str, PoolRuntime]],
                 route: Callable[[str, str], PoolRuntime], hostname: Callable[[str], str], log: LogBuffer,
                 metrics: Any = None) -> None:
        """``route(vip, domain)``: the pool for a domain; ``hostname(vip)``: our name, for EHLO and DSNs."""
        self.store = spool
        self.settings = settings
        self._pools = pools
        self._route = route
        self._hostname = hostname
        self.log = log
        self.metrics = metrics
        self.due: dict[str, float] = {}           # id -> epoch seconds of its next attempt
        # Reminders to look at a message at a time (its due time, or its notice time while its pool is
        # down), so that a wake-up costs what is due, not what is queued; stale ones are skipped.
        self._reminders: list[tuple[float, str]] = []
        self._blocked: dict[str, deque[str]] = {}   # pool -> due messages waiting for its concurrency
        self._in_blocked: set[str] = set()
        self.pool_of: dict[str, str] = {}
        self.active: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._last_scan = 0.0
        self._running: set[asyncio.Task[None]] = set()
        self._arrival: dict[str, float] = {}
        self._warned: set[str] = set()

    # --- into the spool ------------------------------------------------------------------------
    async def spool(self, txn: Transaction, part: Part, body: Body, header: bytes) -> Reply:
        """Write one part of a client transaction to the spool (the forwarder's Spooler)."""
        qid = new_id()
        env = Envelope(id=qid, pool=part.pool.name, sender=txn.mail.address.text,
                       recipients=tuple(r.text for r in part.rcpts), arrival=time.time(),
                       client_ip=txn.client.ip, client_port=txn.client.port, helo=txn.client.helo,
                       esmtp=txn.client.esmtp, vip=txn.vip, size_param=txn.mail.size,
                       body_param=txn.mail.body)
        try:
            size = await asyncio.to_thread(self.store.put, env, [header, *body.chunks()])
        except SpoolError as exc:
            self.log.error(f"{txn.qid}: spool write failed " + fmt(pool=part.pool.name, reason=str(exc)))
            self.log.flush()
            self._count("spool_write_failures")
            return replies.SPOOL_FAILED
        part.queued_as = qid
        self.log.info(f"{txn.qid}: queued " + fmt(queue_id=qid, pool=part.pool.name, size=size,
                                                  nrcpt=len(env.recipients), why=_why(part, txn)))
        # Over queue_load the point is to do less now: the first attempt waits like a retry would.
        self._schedule(qid, env.pool, time.time() + (self.settings.retry_min_seconds if txn.queue_all else 0))
        return replies.OK.with_text(f"Ok: queued as {qid}")

    def _schedule(self, qid: str, pool: str, when: float, arrival: float | None = None) -> None:
        self._set_due(qid, when)
        self.pool_of[qid] = pool
        self._arrival.setdefault(qid, time.time() if arrival is None else arrival)
        self._wake.set()

    # --- running -----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    def flush(self, pool: str | None = None) -> int:
        """Make every message (of ``pool``) due now; how many."""
        now, count = time.time(), 0
        for qid, name in self.pool_of.items():
            if (pool is None or name == pool) and self.due.get(qid, FAR) != FAR:
                self._set_due(qid, now)
                count += 1
        self._wake.set()
        return count

    def pool_changed(self, pool: PoolRuntime) -> None:
        """A pool's state changed: if it can take mail again, flush its messages."""
        if _usable(pool) and any(name == pool.name for name in self.pool_of.values()):
            self.flush(pool.name)

    async def _run(self) -> None:
        ids = await asyncio.to_thread(self.store.recover)
        for qid in ids:
            await self._learn(qid)
        if ids:
            self.log.info("queue recovered " + fmt(messages=len(ids)))
        self._last_scan = time.monotonic()
        while True:
            if time.monotonic() - self._last_scan > RESCAN_SECONDS:
                await self._rescan()
            self._wake.clear()
            now = time.time()
            pools = self._pools()
            # First what waits for a pool's concurrency (in arrival order), then what came due.
            for name, waiting in self._blocked.items():
                sem = self._semaphore(name)
                while waiting and not sem.locked():
                    qid = waiting.popleft()
                    self._in_blocked.discard(qid)
                    self._consider(qid, now, pools)
            while self._reminders and self._reminders[0][0] <= now:
                self._consider(heapq.heappop(self._reminders)[1], now, pools)
            timeout = RESCAN_SECONDS if not self._reminders else min(RESCAN_SECONDS, self._reminders[0][0] - now)
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.01, timeout))
            except TimeoutError:
                pass

    def _set_due(self, qid: str, when: float) -> None:
        # An unchanged time needs no new reminder: the one pushed with it is still to come, or was
        # consumed by a look that scheduled what follows (an attempt, a notice time, a flush).
        if self.due.get(qid) != when and when < FAR:
            heapq.heappush(self._reminders, (when, qid))
        self.due[qid] = when

    def _semaphore(self, pool: str) -> asyncio.Semaphore:
        return self._semaphores.setdefault(pool, asyncio.Semaphore(self.settings.concurrency))

    def _consider(self, qid: str, now: float, pools: dict[str, PoolRuntime]) -> None:
        """Start an attempt for ``qid`` if it is due, its pool can take it and has room."""
        due = self.due.get(qid)
        if due is None or due > now or qid in self.active:
            return              # gone; rescheduled (its reminder is to come); or running (its end reschedules)
        name = self.pool_of.get(qid, "")
        pool = pools.get(name)
        if pool is not None and not _usable(pool):
            notice = self._notice_at(qid)
            if notice > now:
                if notice < FAR:
                    heapq.heappush(self._reminders, (notice, qid))
                return          # flushed when the pool comes back; or its notice is due first
        sem = self._semaphore(name)
        if sem.locked():
            if qid not in self._in_blocked:
                self._in_blocked.add(qid)
                self._blocked.setdefault(name, deque()).append(qid)
            return
        self.active.add(qid)
        task = asyncio.ensure_future(self._attempt(qid, sem))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _notice_at(self, qid: str) -> float:
        """When this message is due a delay notice or its return, pool or no pool: those must not
        wait for a pool that may never come back; telling the sender is the point."""
        arrival = self._arrival.get(qid)
        if arrival is None:
            return FAR
        warn = self.settings.warn_seconds
        if warn and qid not in self._warned and warn < self.settings.return_seconds:
            return arrival + warn
        return arrival + self.settings.return_seconds

    async def _learn(self, qid: str) -> None:
        try:
            env = await asyncio.to_thread(self.store.envelope, qid)
            state = await asyncio.to_thread(self.store.state, qid, env)
        except (OSError, ValueError):
            return
        self._arrival[qid] = env.arrival
        if state.warned or env.kind != "message" or not env.sender:
            self._warned.add(qid)
        self._set_due(qid, FAR if state.held else state.next_attempt)
        self.pool_of[qid] = env.pool

    async def _rescan(self) -> None:
        self._last_scan = time.monotonic()
        on_disk = set(await asyncio.to_thread(self.store.ids))
        for qid in list(self.due):
            if qid not in on_disk and qid not in self.active:
                self._forget(qid)
        for qid in on_disk - set(self.due):
            await self._learn(qid)
        # Held, released and rescheduled by another process: the state files say.
        for qid in list(self.due):
            if qid not in self.active:
                await self._learn(qid)
        # A safety net for a pool that became usable without telling us (a reload that added its
        # servers): what is due for a usable pool gets looked at again.
        now, pools = time.time(), self._pools()
        for qid, due in self.due.items():
            pool = pools.get(self.pool_of.get(qid, ""))
            if due <= now and qid not in self.active and qid not in self._in_blocked and pool is not None \
                    and _usable(pool):
                heapq.heappush(self._reminders, (due, qid))

    def _forget(self, qid: str) -> None:
        self.due.pop(qid, None)
        self.pool_of.pop(qid, None)
        self._arrival.pop(qid, None)
        self._warned.discard(qid)

    # --- one attempt -------------------------------------------------------------------------
    async def _attempt(self, qid: str, sem: asyncio.Semaphore) -> None:
        async with sem:
            fd = await asyncio.to_thread(self.store.lock, qid)
            if fd is None:
                # Another process has it, or it is gone: look again at the next scan.
                if not os.path.exists(self.store.queue / f"{qid}.msg"):
                    self._forget(qid)
                else:
                    self._set_due(qid, time.time() + self.settings.retry_min_seconds)
                self.active.discard(qid)
                return
            try:
                await self._attempt_locked(qid)
            except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the runner
                self.log.error(f"{qid}: queue attempt failed " + fmt(reason=f"{type(exc).__name__}: {exc}"))
                self._set_due(qid, time.time() + self.settings.retry_max_seconds)
            finally:
                # Closing the last descriptor of a removed file frees it, which takes the file system
                # a while: not on the event loop. Shielded, so that a cancelled attempt still closes it.
                try:
                    await asyncio.shield(asyncio.to_thread(os.close, fd))
                finally:
                    self.active.discard(qid)
                    self._wake.set()

    async def _attempt_locked(self, qid: str) -> None:
        env = await asyncio.to_thread(self.store.envelope, qid)
        state = await asyncio.to_thread(self.store.state, qid, env)
        now = time.time()
        if state.held:
            self._set_due(qid, FAR)
            return
        age = now - env.arrival
        if age >= self.settings.return_seconds:
            reason = state.last_error or "4.4.7 message expired in the queue"
            await self._give_up(env, state, [(r, "4.4.7", reason) for r in state.remaining], "expired")
            return
        if (self.settings.warn_seconds and age >= self.settings.warn_seconds and not state.warned
                and env.kind == "message"):
            await self._notify(env, [(r, "4.4.7", state.last_error or None) for r in state.remaining], "delayed")
            state.warned = True
            await asyncio.to_thread(self.store.save_state, qid, state)
        if state.warned or env.kind != "message" or not env.sender:
            self._warned.add(qid)
        pool = self._pools().get(env.pool)
        if pool is None:                      # its pool was removed by a reload: route it again
            pool = self._route(env.vip, address(state.remaining[0]).domain)
        if not _usable(pool):
            self._set_due(qid, FAR if pool.balancer.held else now + self.settings.retry_min_seconds)
            return
        done, failed, retry, error = await self._deliver(env, state.remaining, pool)
        state.attempts += 1
        state.last_attempt = now
        for rcpt, reply in failed:
            state.failed.append({"rcpt": rcpt, "status": reply.status or "5.0.0", "diagnostic": str(reply)})
        if failed:
            await self._notify(env, [(r, rep.status or "5.0.0", str(rep)) for r, rep in failed], "failed")
        state.remaining = retry
        if not retry:
            await asyncio.to_thread(self.store.remove, qid)
            self._forget(qid)
            self._count("spool_deliveries", pool.name)
            self.log.info(f"{qid}: delivered from queue " + fmt(
                pool=pool.name, to=",".join(done) or None, bounced=len(failed) or None,
                attempts=state.attempts, age_seconds=f"{now - env.arrival:.1f}"))
            return
        state.last_error = error
        wait = min(self.settings.retry_max_seconds,
                   self.settings.retry_min_seconds * 2 ** min(state.attempts - 1, 30))
        state.next_attempt = now + wait * random.uniform(0.9, 1.1)
        await asyncio.to_thread(self.store.save_state, qid, state)
        self._set_due(qid, state.next_attempt)
        self._count("spool_deferrals", pool.name)
        self.log.info(f"{qid}: deferred " + fmt(pool=pool.name, to=",".join(retry), reason=error,
                                                attempts=state.attempts, next_in=f"{wait:.0f}s"))

    async def _deliver(self, env: Envelope, rcpts: list[str], pool: PoolRuntime
                       ) -> tuple[list[str], list[tuple[str, Reply]], list[str], str]:
        """One backend transaction for ``rcpts``: (delivered, refused for good, to retry, last error)."""
        f, offset = await asyncio.to_thread(self.store.open_data, env.id)
        size = os.fstat(f.fileno()).st_size - offset
        body = Body.from_file(f, offset, size)
        mail = MailFrom(address=address(env.sender), size=env.size_param, body=env.body_param)
        client = ClientFacts(env.client_ip, env.client_port, env.helo, env.esmtp)
        txn = Transaction(env.id, mail, client, self._hostname(env.vip))
        try:
            answers = [(r, await txn.rcpt(pool, address(r))) for r in rcpts]
            accepted = [r for r, reply in answers if reply.is_positive]
            final: Reply | None = None
            if accepted:
                txn.begin_data()
                final = await txn.finish(body, b"")
            else:
                txn.abort()
        finally:
            body.close()
        done, failed, retry, errors = [], [], [], []
        for rcpt, reply in answers:
            outcome = reply if not reply.is_positive else final
            assert outcome is not None
            if outcome.code == 250:
                done.append(rcpt)
            elif outcome.is_transient:
                retry.append(rcpt)
                errors.append(str(outcome))
            else:
                failed.append((rcpt, outcome))
        return done, failed, retry, errors[-1] if errors else ""

    # --- notifications -----------------------------------------------------------------------
    async def _give_up(self, env: Envelope, state: State, rcpts: list[tuple[str, str, str]], why: str) -> None:
        await self._notify(env, rcpts, "failed")
        await asyncio.to_thread(self.store.remove, env.id)
        self._forget(env.id)
        self.log.warning(f"{env.id}: returned " + fmt(pool=env.pool, to=",".join(r for r, _, _ in rcpts),
                                                      reason=why, attempts=state.attempts))

    async def _notify(self, env: Envelope, rcpts: list[tuple[str, str, str | None]], kind: str) -> None:
        """Queue a DSN to the sender; never to the null sender, never about a DSN."""
        if not env.sender or env.kind != "message" or not rcpts:
            if env.sender == "" or env.kind != "message":
                self.log.info(f"{env.id}: no notice " + fmt(kind=kind, reason="null sender"))
            return
        from .dsn import FailedRecipient, build_dsn
        now = datetime.now(timezone.utc)
        hostname = self._hostname(env.vip)
        f, offset = await asyncio.to_thread(self.store.open_data, env.id)
        with f:
            f.seek(offset)
            original = await asyncio.to_thread(f.read, 256 * 1024)
        recipients = [FailedRecipient(r, status, diag, None, now) for r, status, diag in rcpts]
        until = datetime.fromtimestamp(env.arrival + self.settings.return_seconds, timezone.utc)
        data = build_dsn(kind=kind, reporting_mta=hostname, queue_id=env.id, sender=env.sender,
                         recipients=recipients, arrival=datetime.fromtimestamp(env.arrival, timezone.utc),
                         now=now, original=_unstuff_head(original),
                         will_retry_until=until if kind == "delayed" else None)
        pool = self._bounce_pool(env)
        dsn = Envelope(id=new_id("D"), pool=pool.name, sender="", recipients=(env.sender,), arrival=time.time(),
                       vip=env.vip, kind="dsn")
        try:
            await asyncio.to_thread(self.store.put, dsn, [_stuff(data)])
        except SpoolError as exc:
            self.log.error(f"{env.id}: cannot queue the {kind} notice " + fmt(reason=str(exc)))
            return
        self._count("spool_bounces", kind)
        self.log.info(f"{env.id}: {kind} notice queued " + fmt(queue_id=dsn.id, to=env.sender, pool=pool.name))
        self._schedule(dsn.id, dsn.pool, time.time())

    def _bounce_pool(self, env: Envelope) -> PoolRuntime:
        name = self.settings.bounce_pool
        pools = self._pools()
        if name is not None and name in pools:
            return pools[name]
        return self._route(env.vip, address(env.sender).domain)

    def _count(self, name: str, label: str | None = None) -> None:
        metric = getattr(self.metrics, name, None) if self.metrics is not None else None
        if metric is not None:
            (metric.labels(label) if label is not None else metric).inc()

    # --- for operators (like mailq, postqueue and postsuper) ---------------------------------
    def listing(self, pool: str | None = None) -> list[dict[str, Any]]:
        return [e for e in list_queue(self.store, self.active) if pool is None or e["pool"] == pool]

    def show(self, qid: str) -> dict[str, Any]:
        """One entry with its state and the message's header section."""
        env, state = self._load_for_operator(qid)
        f, offset = self.store.open_data(qid)
        with f:
            f.seek(offset)
            head = f.read(64 * 1024).split(b"\r\n\r\n", 1)[0]
        entry = next(e for e in list_queue(self.store, self.active) if e["id"] == qid) \
            if os.path.exists(self.store.queue / f"{qid}.msg") else {}
        return {**entry, "arrival": env.arrival, "client": env.client_ip, "helo": env.helo, "vip": env.vip,
                "failed": state.failed, "headers": _unstuff_head(head).decode("utf-8", "replace")}

    async def operate(self, qid: str, action: str) -> str:
        """``hold``, ``release``, ``delete`` or ``bounce`` one message; what happened, for the log.

        Waits briefly for the message's lock, so nothing is changed under a delivery in flight;
        KeyError if there is no such message, TimeoutError if it stays locked.
        """
        self._load_for_operator(qid)
        fd = None
        for _ in range(100):
            fd = await asyncio.to_thread(self.store.lock, qid)
            if fd is not None or not os.path.exists(self.store.queue / f"{qid}.msg"):
                break
            await asyncio.sleep(0.05)
        if fd is None:
            if not os.path.exists(self.store.queue / f"{qid}.msg"):
                raise KeyError(qid)
            raise TimeoutError(f"{qid} is being delivered; try again")
        try:
            env = await asyncio.to_thread(self.store.envelope, qid)
            state = await asyncio.to_thread(self.store.state, qid, env)
            if action in ("hold", "release"):
                state.held = action == "hold"
                if not state.held:
                    state.next_attempt = 0.0
                await asyncio.to_thread(self.store.save_state, qid, state)
                self._schedule(qid, env.pool, FAR if state.held else time.time())
                return "held" if state.held else "released"
            if action == "delete":
                await asyncio.to_thread(self.store.remove, qid)
                self._forget(qid)
                return "deleted"
            if action == "bounce":
                await self._give_up(env, state, [(r, "5.0.0", "returned by the operator") for r in state.remaining],
                                    "returned by the operator")
                return "bounced"
            raise ValueError(f"unknown action {action!r}")
        finally:
            os.close(fd)

    def _load_for_operator(self, qid: str) -> tuple[Envelope, State]:
        try:
            env = self.store.envelope(qid)
        except (FileNotFoundError, ValueError):
            raise KeyError(qid) from None
        return env, self.store.state(qid, env)


def list_queue(spool: Spool, active: set[str] | None = None) -> list[dict[str, Any]]:
    now = time.time()
    out = []
    for env, state in spool.entries():
        out.append({"id": env.id, "pool": env.pool, "sender": env.sender, "recipients": state.remaining,
                    "size": _size(spool, env.id), "age_seconds": round(now - env.arrival, 1),
                    "attempts": state.attempts, "last_error": state.last_error, "held": state.held,
                    "next_attempt_seconds": (None if state.held else round(max(0.0, state.next_attempt - now), 1)),
                    "kind": env.kind, "delivering": bool(active and env.id in active)})
    return out


def _size(spool: Spool, qid: str) -> int:
    try:
        return spool.data_size(qid)
    except OSError:
        return 0


def _usable(pool: PoolRuntime) -> bool:
    return not pool.balancer.held and pool.balancer.usable_count() > 0


def _why(part: Part, txn: Transaction) -> str:
    if txn.queue_all:
        return "queue_load"
    if part.pool.balancer.held:
        return "pool held"
    if part.result is not None:
        return str(part.result)
    return "no usable server"


def _stuff(data: bytes) -> bytes:
    """Dot-stuff a message we made (the spool keeps data as it goes on the wire)."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    lines = data.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def _unstuff_head(data: bytes) -> bytes:
    lines = data.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)

