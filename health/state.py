"""Rise/fall counters (HAProxy style) that turn a stream of check results into UP/DOWN transitions.

Pure: no I/O, no clock. A server that is UP goes DOWN after ``fall`` consecutive failed checks; a
server that is DOWN comes UP after ``rise`` consecutive successful checks. A result that agrees with
the current state resets the count, so an isolated failure never takes a server down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["HealthState", "Transition"]

Transition = Literal["up", "down"]


@dataclass(slots=True)
class HealthState:
    """Health of one server. ``consecutive`` counts the results in a row that disagree with ``up``
    (progress towards a flip); it is 0 right after a flip and after any agreeing result."""

    rise: int = 2
    fall: int = 3
    up: bool = True
    consecutive: int = 0

    def __post_init__(self) -> None:
        if self.rise < 1 or self.fall < 1:
            raise ValueError(f"rise and fall must be >= 1, got rise={self.rise} fall={self.fall}")

    def observe(self, ok: bool) -> Transition | None:
        """Record one check result; return ``"up"``/``"down"`` if the state flipped, else None."""
        if ok == self.up:
            self.consecutive = 0
            return None
        self.consecutive += 1
        if self.consecutive < self._threshold():
            return None
        self.up = ok
        self.consecutive = 0
        return "up" if ok else "down"

    def _threshold(self) -> int:
        """Results in a row needed to leave the current state."""
        return self.fall if self.up else self.rise
