"""Per-client connection limits (Postfix anvil's counters): concurrent sessions and connection rate.

Rules: pure bookkeeping with the clock passed in; one instance per VIP in the daemon. A refused
connection is not counted against the concurrency limit but does count toward the rate, as anvil
does (a client hammering a refusing server stays refused).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from ..smtp.replies import Reply
from .verdict import ACCEPT, Verdict

__all__ = ["ClientLimiter", "check_load", "check_pregreet", "check_refused_recipients",
           "TOO_MANY_FROM_CLIENT", "RATE_EXCEEDED", "OVERLOADED", "PREGREET", "TOO_MANY_REFUSED_RCPTS"]

TOO_MANY_FROM_CLIENT = Reply(421, "4.7.0", "Too many connections from your address, try again later")
RATE_EXCEEDED = Reply(421, "4.7.0", "Connection rate limit exceeded, try again later")
OVERLOADED = Reply(421, "4.3.2", "System load too high, try again later")
PREGREET = Reply(554, "5.5.1", "Protocol error: you talked before the greeting")
TOO_MANY_REFUSED_RCPTS = Reply(421, "4.7.0", "Too many refused recipients, closing connection")

WINDOW_SECONDS = 60.0


@dataclass
class ClientLimiter:
    max_concurrent: int = 0          # 0: no limit
    max_per_minute: int = 0          # 0: no limit
    _active: collections.Counter = field(default_factory=collections.Counter)
    _recent: dict[str, collections.deque] = field(default_factory=dict)

    def admit(self, ip: str, now: float) -> Verdict:
        """Count a new connection from ``ip``; a refusal when a limit is exceeded."""
        if self.max_per_minute:
            recent = self._recent.setdefault(ip, collections.deque())
            while recent and now - recent[0] >= WINDOW_SECONDS:
                recent.popleft()
            recent.append(now)
            if len(recent) > self.max_per_minute:
                return Verdict("disconnect", RATE_EXCEEDED, "client_rate")
        if self.max_concurrent and self._active[ip] >= self.max_concurrent:
            return Verdict("disconnect", TOO_MANY_FROM_CLIENT, "client_sessions")
        self._active[ip] += 1
        return ACCEPT

    def release(self, ip: str) -> None:
        if self._active[ip] <= 1:
            self._active.pop(ip, None)
        else:
            self._active[ip] -= 1

    def expire(self, now: float) -> None:
        """Forget clients idle for a whole window (the daemon's sweep calls this)."""
        for ip in [ip for ip, d in self._recent.items() if not d or now - d[-1] >= WINDOW_SECONDS]:
            del self._recent[ip]

    def active(self, ip: str) -> int:
        return self._active[ip]


def check_load(load_1min: float, refuse_load: float | None) -> Verdict:
    """sendmail's RefuseLA: above it, new connections are refused."""
    if refuse_load is not None and load_1min > refuse_load:
        return Verdict("disconnect", OVERLOADED, "refuse_load")
    return ACCEPT


def check_pregreet(bytes_before_greeting: int) -> Verdict:
    """postscreen's pregreet test: an SMTP client waits for the 220; a bot often does not."""
    if bytes_before_greeting:
        return Verdict("disconnect", PREGREET, "pregreet")
    return ACCEPT


def check_refused_recipients(refused: int, budget: int) -> Verdict:
    """After ``budget`` refused recipients in one session (a dictionary attack), close it."""
    if refused >= budget:
        return Verdict("disconnect", TOO_MANY_REFUSED_RCPTS, "refused_recipients")
    return ACCEPT
