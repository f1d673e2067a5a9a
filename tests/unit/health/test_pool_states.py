"""How a pool at run time turns check results, agent reports, failures and operator words into states.

No sockets: results are fed in directly. An event loop runs because hold-offs, ejections and the
slow-start ramp are timers.
"""

from __future__ import annotations

import asyncio

import pytest

from health.checks import CheckResult, parse_agent_reply
from vipd import config
from vipd.errors import BackendTimeout, BackendUnavailable
from vipd.net import pools as pools_mod
from vipd.net.pools import PoolRuntime, ramp_percent

CONFIG = """\
[vip.mx]
listen = ["127.0.0.1:0"]
hostname = "mx.test"
default_pool = "p"

[pool.p]
servers = [{{ address = "127.0.0.1:1", name = "a" }}, {{ address = "127.0.0.1:2", name = "b" }}]
{health}
"""


class Recorder:
    def __init__(self) -> None:
        self.transitions: list[tuple[str, str, str]] = []
        self.failures: list[str] = []
        self.checks: list[bool] = []

    def transition(self, pool: str, server: str, old: str, new: str, reason: str) -> None:
        self.transitions.append((server, old, new))

    def failure(self, pool: str, server: str, detail: str) -> None:
        self.failures.append(server)

    def checked(self, pool: str, server: str, kind: str, result: CheckResult) -> None:
        self.checks.append(result.ok)


def runtime(health: str = "health = { rise = 2, fall = 2 }") -> tuple[PoolRuntime, Recorder]:
    cfg = config.loads(CONFIG.format(health=health))
    events = Recorder()
    return PoolRuntime(cfg.pools["p"], events), events


OK = CheckResult(True, "EHLO 250", 0.001)
BAD = CheckResult(False, "ConnectionRefusedError", 0.001)


def run(coro):
    return asyncio.run(coro)


def test_fall_then_rise() -> None:
    async def go() -> None:
        pool, events = runtime()
        a = pool.balancer.backend("a")
        pool.observe_check("a", BAD)
        assert a.state == "up"                      # one failure is not enough (fall = 2)
        pool.observe_check("a", BAD)
        assert a.state == "down"
        pool.observe_check("a", OK)
        assert a.state == "down"
        pool.observe_check("a", OK)
        assert a.state == "up"
        assert events.transitions == [("a", "up", "down"), ("a", "down", "up")]
        assert pool.watch["a"].last_check is OK
    run(go())


def test_agent_drain_down_weight_and_silence() -> None:
    async def go() -> None:
        pool, events = runtime("health = { smtp = false, agent_port = 9, fall = 2 }")
        a = pool.balancer.backend("a")
        pool.observe_agent("a", parse_agent_reply("ready up 75%"))
        assert (a.state, a.agent_percent) == ("up", 75)
        pool.observe_agent("a", parse_agent_reply("drain"))
        assert (a.state, a.agent_percent) == ("drain", 75)
        pool.observe_agent("a", parse_agent_reply("down"))
        assert a.state == "down"
        pool.observe_agent("a", parse_agent_reply("# load unknown"))   # no state word: no change
        assert a.state == "down"
        pool.observe_agent("a", None, "refused")
        assert a.state == "down"                      # one silence is not enough (fall = 2)
        pool.observe_agent("a", None, "refused")
        assert (a.state, a.agent_percent) == ("up", 100)
        assert [t[2] for t in events.transitions] == ["drain", "down", "up"]
    run(go())


def test_draining_closes_idle_connections_and_ready_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        pool, _ = runtime()
        closed: list[str] = []
        monkeypatch.setattr(pool._conns["a"], "close_all", lambda: closed.append("a"))
        pool.set_admin("a", "drain", "test")
        assert pool.balancer.backend("a").state == "drain"
        assert closed == ["a"]
        assert {pool.balancer.pick("192.0.2.1").name for _ in range(4)} == {"b"}  # type: ignore[union-attr]
        pool.set_admin("a", "ready", "test")
        assert pool.balancer.backend("a").state == "up"
        with pytest.raises(KeyError):
            pool.set_admin("nope", "drain", "test")
    run(go())


def test_passive_failures_eject_until_rise_checks_pass() -> None:
    async def go() -> None:
        pool, events = runtime("health = { rise = 2, fall = 2, passive_failures = 3 }")
        a = pool.balancer.backend("a")
        for _ in range(3):
            pool.mark_failed(a, BackendTimeout("timeout"), holdoff=False)
        assert a.ejected and a.state == "down"
        assert events.failures == ["a", "a", "a"]
        pool.observe_check("a", OK)
        assert a.state == "down"
        pool.observe_check("a", OK)
        assert a.state == "up" and not a.ejected
    run(go())


def test_without_active_checks_ejection_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pools_mod, "EJECT_SECONDS", 0.05)

    async def go() -> None:
        pool, _ = runtime("")
        a = pool.balancer.backend("a")
        for _ in range(3):
            pool.mark_failed(a, BackendUnavailable("refused"), holdoff=False)
        assert a.state == "down"
        await asyncio.sleep(0.2)
        assert a.state == "up"
    run(go())


def test_a_clean_transaction_resets_the_failure_count() -> None:
    async def go() -> None:
        pool, _ = runtime()
        a = pool.balancer.backend("a")
        pool.mark_failed(a, BackendTimeout("t"), holdoff=False)
        pool.mark_failed(a, BackendTimeout("t"), holdoff=False)
        pool.watch["a"].failures = 0    # what give_back(reusable=True) does after a clean transaction
        pool.mark_failed(a, BackendTimeout("t"), holdoff=False)
        assert not a.ejected
    run(go())


def test_slow_start_ramps_after_coming_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pools_mod, "RAMP_TICK_SECONDS", 0.02)

    async def go() -> None:
        pool, _ = runtime("health = { rise = 1, fall = 1, slowstart_seconds = 0.3 }")
        a = pool.balancer.backend("a")
        pool.observe_check("a", BAD)
        pool.observe_check("a", OK)
        assert a.state == "up" and a.ramp_percent < 50
        seen = [a.ramp_percent]
        for _ in range(30):
            await asyncio.sleep(0.02)
            seen.append(a.ramp_percent)
        assert seen == sorted(seen) and seen[-1] == 100 and len(set(seen)) > 3
    run(go())


def test_held_pool() -> None:
    async def go() -> None:
        pool, _ = runtime()
        pool.set_held(True)
        assert pool.balancer.pick("192.0.2.1") is None
        assert pool.held_since is not None
        pool.set_held(False)
        assert pool.balancer.pick("192.0.2.1") is not None
    run(go())


@pytest.mark.parametrize(("elapsed", "period", "percent"),
                         [(0, 10, 1), (1, 10, 10), (5, 10, 50), (9.99, 10, 100), (10, 10, 100), (3, 0, 100)])
def test_ramp_percent(elapsed: float, period: float, percent: int) -> None:
    assert ramp_percent(elapsed, period) == percent


def test_a_passing_check_ends_a_hold_off() -> None:
    async def go() -> None:
        pool, _ = runtime()
        a = pool.balancer.backend("a")
        pool.mark_failed(a, BackendUnavailable("refused"))
        assert a.held_off and a.state == "down"
        pool.observe_check("a", OK)
        assert not a.held_off and a.state == "up"
        assert "holdoff" not in pool.watch["a"].timers
    run(go())
