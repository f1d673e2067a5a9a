"""Unit tests for server states in the balancer: which input wins, effective weights, backups, holds."""

from __future__ import annotations

from collections import Counter

import pytest

from vipd.balance import Backend, Pool


def pool_of(*backends: Backend, algorithm: str = "roundrobin") -> Pool:
    return Pool("p", algorithm, backends)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        ({}, "up"),
        ({"admin": "drain"}, "drain"),
        ({"agent": "drain"}, "drain"),
        ({"admin": "maint"}, "maint"),
        ({"agent": "maint"}, "maint"),
        ({"healthy": False}, "down"),
        ({"held_off": True}, "down"),
        ({"ejected": True}, "down"),
        ({"agent_down": True}, "down"),
        ({"agent_down": True, "agent": "drain"}, "down"),
        # A broken server shows down even while drained: that is what needs attention.
        ({"admin": "drain", "healthy": False}, "down"),
        # Maintenance wins over everything: the operator took it out on purpose.
        ({"admin": "maint", "healthy": False}, "maint"),
        ({"agent": "maint", "admin": "drain"}, "maint"),
    ],
)
def test_state_from_inputs(fields: dict, state: str) -> None:
    b = Backend("a", "a:25", **fields)
    assert b.state == state
    assert b.usable is (state == "up")
    assert b.qualifies() is (state == "up")


def test_drain_takes_no_new_transactions_but_counts_its_current_ones() -> None:
    a, b = Backend("a", "a:25"), Backend("b", "b:25")
    pool = pool_of(a, b)
    first = pool.pick("192.0.2.1")
    assert first is not None
    pool.acquire(first)
    first.admin = "drain"
    other = b if first is a else a
    assert {pool.pick("192.0.2.1").name for _ in range(6)} == {other.name}  # type: ignore[union-attr]
    pool.release(first)
    assert first.active == 0


def test_agent_percent_and_ramp_scale_the_share() -> None:
    a = Backend("a", "a:25", weight=2, agent_percent=50)   # effectively 1
    b = Backend("b", "b:25", weight=1)
    pool = pool_of(a, b)
    picks = Counter(pool.pick("192.0.2.1").name for _ in range(100))  # type: ignore[union-attr]
    assert picks == {"a": 50, "b": 50}
    a.ramp_percent = 25                                       # effectively 0.25 against 1
    pool = pool_of(a, b)
    picks = Counter(pool.pick("192.0.2.1").name for _ in range(100))  # type: ignore[union-attr]
    assert picks == {"a": 20, "b": 80}


def test_zero_percent_means_no_transactions_but_the_server_stays_up() -> None:
    a, b = Backend("a", "a:25", agent_percent=0), Backend("b", "b:25")
    pool = pool_of(a, b)
    assert a.state == "up"
    assert {pool.pick("192.0.2.1").name for _ in range(5)} == {"b"}  # type: ignore[union-attr]
    assert pool.usable_count() == 1


def test_operator_weight_overrides_the_configured_one() -> None:
    a, b = Backend("a", "a:25", weight=1), Backend("b", "b:25", weight=1)
    a.weight_override = 3
    pool = pool_of(a, b)
    picks = Counter(pool.pick("192.0.2.1").name for _ in range(8))  # type: ignore[union-attr]
    assert picks == {"a": 6, "b": 2}
    assert pool.statistics().servers[0].effective_weight == 3.0


@pytest.mark.parametrize("algorithm", ["roundrobin", "leastconn", "source"])
def test_backups_only_when_no_primary_is_usable(algorithm: str) -> None:
    a, b = Backend("a", "a:25"), Backend("b", "b:25")
    spare = Backend("spare", "s:25", backup=True)
    pool = pool_of(a, b, spare, algorithm=algorithm)
    assert {pool.pick(f"192.0.2.{i}").name for i in range(20)} <= {"a", "b"}  # type: ignore[union-attr]
    a.admin, b.healthy = "maint", False
    assert {pool.pick(f"192.0.2.{i}").name for i in range(20)} == {"spare"}  # type: ignore[union-attr]
    b.healthy = True
    assert {pool.pick(f"192.0.2.{i}").name for i in range(20)} == {"b"}  # type: ignore[union-attr]


def test_a_held_pool_gives_nothing_and_release_restores_it() -> None:
    pool = pool_of(Backend("a", "a:25"), Backend("spare", "s:25", backup=True))
    pool.held = True
    assert pool.pick("192.0.2.1") is None
    assert pool.statistics().held is True
    pool.held = False
    assert pool.pick("192.0.2.1").name == "a"  # type: ignore[union-attr]


def test_update_keeps_runtime_states() -> None:
    pool = pool_of(Backend("a", "a:25"), Backend("b", "b:25"))
    a = pool.backend("a")
    a.admin, a.healthy, a.agent_percent, a.weight_override = "drain", False, 40, 7
    pool.update([("a", "a:2525", 2, False, None), ("c", "c:25", 1, False, None)])
    kept = pool.backend("a")
    assert kept is a
    assert (kept.admin, kept.healthy, kept.agent_percent, kept.weight_override) == ("drain", False, 40, 7)
    assert (kept.address, kept.weight) == ("a:2525", 2)
