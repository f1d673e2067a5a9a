"""From samples to figures: per system and load, the median with min and max of each repeat.

Figures (see bench/README.md):
- ``msgs_per_s``: messages over seconds (first connection to last message in the sinks).
- ``ratio``: median msgs/s over the baseline's median msgs/s for the same load.
- ``cpu_ms_per_msg``: the system's own CPU (its process trees, reaped children included) per message.
- ``peak_rss_mib``: the largest sum of RSS over its process trees during the run.
- ``added_latency_ms``: at one session only, median time per message minus the baseline's.
- ``sink_cpu_ms_per_msg``, ``generator_cpu_ms_per_msg``: the same CPU figure for the two sinks and
  for smtp-source, to see how busy the rest of the machine was.

Rules: pure functions of the samples; failed samples are left out of the figures and their errors
are kept; a figure with no value in any sample is None.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

from .loads import Load
from .measure import Sample

__all__ = ["Spread", "Summary", "summarize", "BASELINE"]

BASELINE = "baseline"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        return cls(statistics.median(values), min(values), max(values)) if values else None


@dataclass
class Summary:
    system: str
    load: str
    runs: int
    errors: list[str] = field(default_factory=list)
    msgs_per_s: Spread | None = None
    ratio: float | None = None
    cpu_ms_per_msg: Spread | None = None
    peak_rss_mib: Spread | None = None
    added_latency_ms: float | None = None
    sink_cpu_ms_per_msg: Spread | None = None
    generator_cpu_ms_per_msg: Spread | None = None

    def to_json(self) -> dict:
        return asdict(self)


_FIGURES: dict[str, Callable[[Sample], float | None]] = {
    "msgs_per_s": lambda s: s.messages / s.seconds,
    "cpu_ms_per_msg": lambda s: None if s.cpu_seconds is None else 1000 * s.cpu_seconds / s.messages,
    "peak_rss_mib": lambda s: None if s.peak_rss_bytes is None else s.peak_rss_bytes / MIB,
    "sink_cpu_ms_per_msg": lambda s: 1000 * s.sink_cpu_seconds / s.messages,
    "generator_cpu_ms_per_msg": lambda s: 1000 * s.generator_cpu_seconds / s.messages,
}


def summarize(samples: list[Sample], systems: list[str], loads: list[Load]) -> list[Summary]:
    """One Summary per (load, system) that has samples, in load order then system order."""
    summaries = []
    for load in loads:
        by_system = {name: _summary(name, load, samples) for name in systems}
        base = by_system.get(BASELINE)
        for name in systems:
            summary = by_system[name]
            if summary is None:
                continue
            if base is not None:
                _compare(summary, base, load, samples)
            summaries.append(summary)
    return summaries


def _summary(system: str, load: Load, samples: list[Sample]) -> Summary | None:
    mine = [s for s in samples if s.system == system and s.load == load.name]
    if not mine:
        return None
    good = [s for s in mine if s.ok]
    summary = Summary(system, load.name, len(good), [s.error for s in mine if s.error])
    for name, figure in _FIGURES.items():
        setattr(summary, name, Spread.of([v for s in good if (v := figure(s)) is not None]))
    return summary


def _compare(summary: Summary, base: Summary, load: Load, samples: list[Sample]) -> None:
    if summary.msgs_per_s and base.msgs_per_s:
        summary.ratio = summary.msgs_per_s.median / base.msgs_per_s.median
    if load.sessions == 1:
        mine, theirs = _ms_per_msg(summary, load, samples), _ms_per_msg(base, load, samples)
        if mine is not None and theirs is not None:
            summary.added_latency_ms = mine - theirs


def _ms_per_msg(summary: Summary, load: Load, samples: list[Sample]) -> float | None:
    times = [1000 * s.seconds / s.messages for s in samples
             if s.ok and s.system == summary.system and s.load == load.name]
    return statistics.median(times) if times else None
