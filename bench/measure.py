"""One measurement: one system, freshly started, under one load.

Sequence: start the system in front of the sinks; warm it up (or, the first time a system meets a
load, calibrate: after a warm-up batch, send growing batches until one takes half a second, and
size the measured batch to take ``target_seconds``); read its CPU; send the batch while sampling
its memory; wait until the sinks hold every message; let it settle 0.2 s; read its CPU again;
stop it.

Rules:
- The clock runs from starting the load generator to the last message reaching the sinks, so a
  relay that queues counts until it has delivered, not until it has answered.
- The batch size found by calibration serves the next repeats of that (system, load), unless a
  measurement took under 0.6 or over 1.7 times ``target_seconds`` (the machine was busier or
  quieter than during calibration): then it is rescaled to the target. The rate is a rate, so
  batch sizes may differ between repeats and systems.
- Any failure becomes a Sample with ``error`` set and the run goes on; the workdir is kept then.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import proctree
from .loads import Load, RunError, send
from .postfix import Tools
from .process import wait_for
from .sinks import Sinks
from .system import Endpoint, System

__all__ = ["Sample", "Bench", "measure", "next_count"]

CALIBRATION_SECONDS = 0.5
MAX_MESSAGES = 1_000_000
SETTLE_SECONDS = 0.2
DELIVERY_TIMEOUT = 30.0
RESIZE_BELOW, RESIZE_ABOVE = 0.6, 1.7


@dataclass
class Sample:
    """What one measurement saw. CPU and memory are None for a system without processes."""

    system: str
    load: str
    repeat: int
    messages: int = 0
    seconds: float = 0.0                    # first connection to the last message in the sinks
    cpu_seconds: float | None = None        # the system's process trees, utime+stime+cutime+cstime
    peak_rss_bytes: int | None = None       # the largest sum of RSS over those trees
    sink_cpu_seconds: float = 0.0           # both sinks together
    generator_cpu_seconds: float = 0.0      # smtp-source
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.messages > 0 and self.seconds > 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Bench:
    """What every measurement of a run shares."""

    tools: Tools
    sinks: Sinks
    workroot: Path
    target_seconds: float
    keep_workdirs: bool = False

    def run_timeout(self) -> float:
        return max(60.0, 10 * self.target_seconds)


def measure(bench: Bench, system: System, load: Load, repeat: int, count: int | None) -> Sample:
    """Measure ``system`` under ``load``; ``count`` None means calibrate first (and set ``messages``)."""
    sample = Sample(system.name, load.name, repeat)
    workdir = bench.workroot / f"{system.name}-{load.name}-r{repeat}"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        target = system.start(workdir, bench.sinks.endpoints)
        if count is None:
            count = _calibrate(bench, target, load)
        else:
            _deliver(bench, target, load, _warmup_count(count, load))
        _timed(bench, system, target, load, count, sample)
    except Exception as exc:  # noqa: BLE001 - one system failing must not end a long run
        sample.error = f"{type(exc).__name__}: {exc} (workdir {workdir})"
    finally:
        _stop(system, sample)
    if sample.error is None and not bench.keep_workdirs:
        shutil.rmtree(workdir, ignore_errors=True)
    return sample


def next_count(bench: Bench, load: Load, sample: Sample) -> int:
    """The batch size for the next repeat: the same, or rescaled if this one missed the target."""
    ratio = sample.seconds / bench.target_seconds
    if RESIZE_BELOW <= ratio <= RESIZE_ABOVE:
        return sample.messages
    return _batch(load, sample.messages / ratio)


def _stop(system: System, sample: Sample) -> None:
    try:
        system.stop()
    except Exception as exc:  # noqa: BLE001
        sample.error = sample.error or f"stop failed: {type(exc).__name__}: {exc}"


def _timed(bench: Bench, system: System, target: Endpoint, load: Load, count: int, sample: Sample) -> None:
    roots, sinks = system.pids(), bench.sinks.pids()
    cpu0, sink0 = proctree.cpu_seconds(roots), proctree.cpu_seconds(sinks)
    with proctree.PeakRss(roots) as peak:
        sample.seconds, sample.generator_cpu_seconds = _deliver(bench, target, load, count)
        time.sleep(SETTLE_SECONDS)
    sample.messages = count
    sample.sink_cpu_seconds = proctree.cpu_seconds(sinks) - sink0
    if roots:
        sample.cpu_seconds = proctree.cpu_seconds(roots) - cpu0
        sample.peak_rss_bytes = peak.bytes


def _deliver(bench: Bench, target: Endpoint, load: Load, count: int) -> tuple[float, float]:
    """Send ``count`` messages and wait until the sinks have them: (seconds, generator CPU seconds)."""
    sinks = bench.sinks
    sinks.reset_logs()
    before = sinks.delivered()
    start = time.perf_counter()
    generator_cpu = send(bench.tools, load, count, target, bench.run_timeout())
    try:
        wait_for(lambda: sinks.delivered() - before >= count, DELIVERY_TIMEOUT, "the sinks", interval=0.005)
    except TimeoutError:
        raise RunError(f"the sinks got {sinks.delivered() - before} of {count} messages "
                       f"in {DELIVERY_TIMEOUT:g} s after smtp-source ended") from None
    return time.perf_counter() - start, generator_cpu


def _calibrate(bench: Bench, target: Endpoint, load: Load) -> int:
    """The batch size that takes about ``target_seconds``.

    A first batch warms the system up (a fresh process is slow at first) and is not timed; then
    batches grow until one takes ``CALIBRATION_SECONDS``, and the batch size is scaled from it.
    """
    count = _warmup_count(0, load)
    _deliver(bench, target, load, count)
    while True:
        seconds, _ = _deliver(bench, target, load, count)
        if seconds >= CALIBRATION_SECONDS or count >= MAX_MESSAGES:
            break
        count = min(MAX_MESSAGES, math.ceil(count * min(10.0, 1.2 * CALIBRATION_SECONDS / max(seconds, 0.01))))
    return _batch(load, count * bench.target_seconds / seconds)


def _batch(load: Load, messages: float) -> int:
    """A measured batch: at least two messages per session (and 10), at most MAX_MESSAGES."""
    return max(2 * load.sessions, 10, min(MAX_MESSAGES, round(messages)))


def _warmup_count(count: int, load: Load) -> int:
    """A twentieth of the batch, but at least one message per session (and 10)."""
    return max(load.sessions, 10, count // 20)
