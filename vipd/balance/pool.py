"""Choose a backend server for one transaction: the pure balancer of one pool.

Rules of this module:

- It is pure: no asyncio, sockets, clocks or global randomness. The only chance
  comes from an injected ``random.Random``, so a seeded pool is deterministic.
- A server's state is ``up``, ``drain``, ``down`` or ``maint``, worked out from
  separate inputs that never overwrite each other: the operator's admin state,
  the active checks' verdict, the agent's last report and the passive hold-off
  after a failed connection. Which input wins is in ``Backend.state``.
- A server qualifies for a pick when it is ``up``, has an effective weight > 0,
  is not excluded by name and, when it has ``max_sessions``, is below that cap.
  Backup servers are considered only when no primary qualifies; nothing
  qualifies while the pool is held (the operator's shut-off valve).
- The effective weight is the weight (the operator's, else the configured one)
  scaled by the agent's percentage and the slow-start ramp. The policies that
  set those inputs (health monitor, passive checks, admin API) live elsewhere.
- Picking counts ``selected``; ``active`` changes only through ``acquire`` and
  ``release``, because a pick may be abandoned before a transaction starts.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, cast, get_args

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

Algorithm = Literal["roundrobin", "leastconn", "source"]
ALGORITHMS: frozenset[str] = frozenset(get_args(Algorithm))
MAX_WEIGHT = 256  # HAProxy's range, so operators' weights carry over unchanged
State = Literal["up", "drain", "down", "maint"]
AdminState = Literal["ready", "drain", "maint"]
ADMIN_STATES: frozenset[str] = frozenset(get_args(AdminState))
AgentState = Literal["up", "drain", "maint"]  # the agent's admin opinion; "up" is its "ready"
# Effective weights are weight x percent x percent: integer, so the algorithms stay exact.
_SCALE = 100 * 100


@dataclass(slots=True, eq=False)
class Backend:
    """Configuration and mutable runtime state of one server in a pool.

    ``eq=False`` keeps identity semantics: two servers with equal fields are
    still two servers, and a holder of a Backend can always release it.
    """

    name: str
    address: str  # host:port, for logs only
    weight: int = 1
    backup: bool = False
    max_sessions: int | None = None
    active: int = 0  # transactions in flight
    selected: int = 0  # times picked, for metrics
    admin: AdminState = "ready"  # the operator's word
    healthy: bool = True  # active checks (and passive ejection) say it works
    agent: AgentState = "up"  # the agent's last admin opinion
    agent_down: bool = False  # the agent's last operational opinion
    agent_percent: int = 100  # the agent's weight, 0..100
    held_off: bool = False  # a fresh connection just failed: left out briefly
    ejected: bool = False  # passive checks: too many failed transactions in a row
    ramp_percent: int = 100  # slow start after coming back, 1..100
    weight_override: int | None = None  # the operator's runtime weight

    def __post_init__(self) -> None:
        _check_config(self.name, self.weight, self.max_sessions)

    @property
    def state(self) -> State:
        """What the server is doing now. An operator's or agent's ``maint`` wins over all; a server
        that does not work shows ``down`` even while drained, because that is what needs attention."""
        if self.admin == "maint" or self.agent == "maint":
            return "maint"
        if not self.healthy or self.held_off or self.ejected or self.agent_down:
            return "down"
        if self.admin == "drain" or self.agent == "drain":
            return "drain"
        return "up"

    @property
    def usable(self) -> bool:
        return self.state == "up"

    @property
    def current_weight(self) -> int:
        """The weight before scaling: the operator's runtime weight, else the configured one."""
        return self.weight if self.weight_override is None else self.weight_override

    @property
    def effective(self) -> int:
        """The weight the algorithms use, in units of 1/10000 of a weight (exact: no rounding)."""
        return self.current_weight * self.agent_percent * self.ramp_percent

    def qualifies(self, exclude: Collection[str] = ()) -> bool:
        """Whether ``pick`` may return this server right now."""
        if self.state != "up" or self.effective <= 0 or self.name in exclude:
            return False
        return self.max_sessions is None or self.active < self.max_sessions


class ServerSpec(NamedTuple):
    """The configured part of a server, as a config reload delivers it."""

    name: str
    address: str
    weight: int = 1
    backup: bool = False
    max_sessions: int | None = None


SpecLike = tuple[str, str, int, bool, int | None]


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """A snapshot of one server, for metrics and the status page."""

    name: str
    address: str
    weight: int
    backup: bool
    max_sessions: int | None
    usable: bool
    active: int
    selected: int
    state: State
    admin: AdminState
    healthy: bool
    ejected: bool
    agent: AgentState
    agent_down: bool
    agent_percent: int
    ramp_percent: int
    current_weight: int

    @property
    def effective_weight(self) -> float:
        """The weight the balancer uses now, in the configured weight's units."""
        return self.current_weight * self.agent_percent * self.ramp_percent / _SCALE


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a whole pool, in configuration order."""

    name: str
    algorithm: Algorithm
    servers: tuple[ServerStatistics, ...]
    held: bool = False


class Pool:
    """A named set of backends and the algorithm that spreads transactions over them."""

    __slots__ = ("name", "held", "_algorithm", "_backends", "_current", "_rng")

    def __init__(
        self,
        name: str,
        algorithm: Algorithm,
        backends: Iterable[Backend],
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.held = False  # the operator's shut-off valve: nothing qualifies
        self._algorithm = _check_algorithm(algorithm)
        self._backends: tuple[Backend, ...] = _unique(tuple(backends))
        # Smooth weighted round robin's running "current weight" per server name.
        self._current: dict[str, int] = {}
        self._rng = rng
        self._randomize_phase()

    @classmethod
    def from_specs(
        cls,
        name: str,
        algorithm: Algorithm,
        specs: Iterable[SpecLike],
        rng: random.Random | None = None,
    ) -> Pool:
        """Build a pool straight from configuration tuples."""
        return cls(name, algorithm, [_backend_from(spec) for spec in specs], rng)

    @property
    def algorithm(self) -> Algorithm:
        return self._algorithm

    @property
    def backends(self) -> tuple[Backend, ...]:
        return self._backends

    def backend(self, name: str) -> Backend:
        """The server called ``name``; KeyError if the pool has none."""
        for b in self._backends:
            if b.name == name:
                return b
        raise KeyError(name)

    def pick(self, client_ip: str, exclude: Collection[str] = ()) -> Backend | None:
        """Choose a server for a transaction from ``client_ip``, or None if none qualifies.

        ``exclude`` names servers already tried for this transaction, so a retry
        never lands on the server that just failed it.
        """
        if self.held:
            return None
        for backup in (False, True):
            tier = [b for b in self._backends if b.backup == backup and b.qualifies(exclude)]
            if tier:
                chosen = self._choose(tier, client_ip)
                chosen.selected += 1
                return chosen
        return None

    def acquire(self, backend: Backend) -> None:
        """Count a transaction that starts on ``backend``."""
        backend.active += 1

    def release(self, backend: Backend) -> None:
        """Count a transaction that ended on ``backend``.

        Clamped at zero so a double release (say, an error path racing a normal
        close) cannot make a server look less loaded than idle.
        """
        backend.active = max(0, backend.active - 1)

    def update(self, specs: Iterable[SpecLike], algorithm: Algorithm | None = None) -> None:
        """Apply a reloaded configuration, keeping the runtime state of kept servers.

        A kept server stays the same object, so transactions in flight release
        the counter they acquired. Everything is validated before anything changes.
        """
        new_algorithm = self._algorithm if algorithm is None else _check_algorithm(algorithm)
        fresh = _unique(tuple(_backend_from(spec) for spec in specs))
        old = {b.name: b for b in self._backends}
        self._backends = tuple(_merge(old.get(b.name), b) for b in fresh)
        self._algorithm = new_algorithm
        self._current = {b.name: self._current.get(b.name, 0) for b in self._backends}

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot that metrics can read without seeing later changes."""
        servers = tuple(_snapshot(b) for b in self._backends)
        return PoolStatistics(self.name, self._algorithm, servers, self.held)

    def usable_count(self) -> int:
        """Servers that could take a transaction now (caps aside), backups included."""
        return sum(1 for b in self._backends if b.usable and b.effective > 0)

    def _choose(self, candidates: Sequence[Backend], client_ip: str) -> Backend:
        if self._algorithm == "roundrobin":
            return self._smooth_round_robin(candidates)
        if self._algorithm == "leastconn":
            return self._least_connections(candidates)
        return _source_hash(candidates, client_ip)

    def _smooth_round_robin(self, candidates: Sequence[Backend]) -> Backend:
        # nginx's smooth weighted round robin: weights 2:1 give a,b,a,a,b,a rather
        # than a,a,b bursts, so a heavy server never takes a run of connections.
        # Only candidates take part, as nginx skips peers that are down.
        total = 0
        best: Backend | None = None
        for b in candidates:
            w = b.effective
            self._current[b.name] = self._current.get(b.name, 0) + w
            total += w
            if best is None or self._current[b.name] > self._current[best.name]:
                best = b
        assert best is not None, "callers pass at least one candidate"
        self._current[best.name] -= total
        return best

    def _least_connections(self, candidates: Sequence[Backend]) -> Backend:
        # active/weight compared by cross-multiplying: exact, so equal loads are
        # a tie (floats could split them), and cheaper than Fraction per pick.
        best = candidates[0]
        for b in candidates[1:]:
            if b.active * best.effective < best.active * b.effective:
                best = b
        tied = [b for b in candidates if b.active * best.effective == best.active * b.effective]
        # Short SMTP transactions leave most servers idle most of the time, so
        # ties are the common case; rotating through them by weight keeps both
        # the spread and the configured ratio.
        return self._smooth_round_robin(tied)

    def _randomize_phase(self) -> None:
        # Every worker process builds the same pool from the same config; without
        # a random starting phase they would all send their first transactions to
        # the same server in lock-step.
        if self._rng is None:
            return
        for backup in (False, True):
            tier = [b for b in self._backends if b.backup == backup and b.weight > 0]
            if tier:
                # Configured weights only count the steps; the steps themselves run on effective ones.
                for _ in range(self._rng.randrange(sum(b.weight for b in tier))):
                    self._smooth_round_robin(tier)


def _source_hash(candidates: Sequence[Backend], client_ip: str) -> Backend:
    # Weighted rendezvous hashing: each (server, client) pair gets a stable score
    # and the best qualifying server wins. Excluding a server moves only its own
    # clients, each to its next best server, so the fall-through is deterministic
    # and everyone else keeps their server.
    return max(candidates, key=lambda b: (_rendezvous_score(b, client_ip), b.name))


def _rendezvous_score(backend: Backend, client_ip: str) -> float:
    # blake2b, not hash(): Python's string hash is salted per process, and
    # workers and restarts must agree on where a client goes.
    digest = hashlib.blake2b(f"{backend.name}\0{client_ip}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1), never 0 or 1
    return backend.effective / -math.log(unit)


def _backend_from(spec: SpecLike) -> Backend:
    s = ServerSpec(*spec)
    return Backend(s.name, s.address, s.weight, s.backup, s.max_sessions)


def _merge(kept: Backend | None, fresh: Backend) -> Backend:
    if kept is None:
        return fresh
    kept.address, kept.weight = fresh.address, fresh.weight
    kept.backup, kept.max_sessions = fresh.backup, fresh.max_sessions
    return kept


def _snapshot(b: Backend) -> ServerStatistics:
    return ServerStatistics(
        b.name, b.address, b.weight, b.backup, b.max_sessions, b.usable, b.active, b.selected,
        b.state, b.admin, b.healthy, b.ejected, b.agent, b.agent_down, b.agent_percent, b.ramp_percent,
        b.current_weight,
    )


def _check_algorithm(algorithm: str) -> Algorithm:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown balance algorithm {algorithm!r}; expected one of {sorted(ALGORITHMS)}")
    return cast(Algorithm, algorithm)


def _check_config(name: str, weight: int, max_sessions: int | None) -> None:
    if not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"server {name!r}: weight must be 0..{MAX_WEIGHT}, got {weight}")
    if max_sessions is not None and max_sessions < 1:
        raise ValueError(f"server {name!r}: max_sessions must be at least 1, got {max_sessions}")


def _unique(backends: tuple[Backend, ...]) -> tuple[Backend, ...]:
    counts = Counter(b.name for b in backends)
    duplicates = sorted(name for name, n in counts.items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate server names in pool: {', '.join(duplicates)}")
    return backends
