"""The comparison run: every system under every load, repeats interleaved, then the reports.

Order: for each load, for each repeat, each system in turn (A B C A B C ...), so a slow phase of
the machine hits every system alike. Each measurement starts its system afresh (see measure.py);
the two sinks run for the whole run. The baseline always runs: it is what ratios and added
latency are computed against. After the systems, the protocol-core micro-benchmark runs, then
(unless ``--smoke``) the measurement of vipd's memory per idle session (bench.idle), and everything
goes into ``latest.json``, ``latest.md`` and the PNGs of the results folder.

Rules: a system whose prepare() raises Unavailable is reported with the reason and skipped; a
measurement that fails is reported and the run goes on, but a system that fails twice in a row is
dropped from the rest of the run (a hung system would otherwise cost a timeout per measurement);
the sinks are stopped whatever happens.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import plots, postfix, report
from .idle import DEFAULT_SESSIONS, IdleResult, run_idle
from .loads import Load
from .measure import Bench, Sample, measure, next_count
from .micro import run_micro
from .sinks import Sinks
from .stats import BASELINE, summarize
from .system import System, Unavailable
from .systems import PeersError, core_systems, peers

__all__ = ["Options", "run_compare", "select_systems", "DEFAULT_RESULTS", "DEFAULT_CACHE"]

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
MAX_FAILURES_IN_A_ROW = 2
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vipd-bench"


@dataclass
class Options:
    loads: list[Load]
    repeats: int
    seconds: float                    # target length of one measurement
    results: Path
    cache: Path
    systems: list[str] | None = None  # None: all
    micro_seconds: float = 1.0
    micro_repeats: int = 3
    keep_workdirs: bool = False
    command: str = "compare"
    idle: bool = True                 # measure vipd's memory per idle session (repeats: ``repeats``)
    idle_sessions: int = DEFAULT_SESSIONS


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def select_systems(names: list[str] | None) -> tuple[list[System], dict[str, str]]:
    """The systems to run (baseline first, always), and those that cannot (name -> reason).

    ``bench.peers`` is imported only when ``names`` is None (all) or names a system not built in.
    """
    systems, unavailable = core_systems(), {}
    if names is None or not set(names) <= {s.name for s in systems}:
        try:
            systems += peers()
        except PeersError as exc:
            unavailable["peers"] = f"not run: {exc}"
    if names is None:
        return systems, unavailable
    unknown = set(names) - {s.name for s in systems}
    if unknown and not unavailable:
        known = ", ".join(s.name for s in systems)
        raise ValueError(f"unknown system(s) {', '.join(sorted(unknown))}; known: {known}")
    return [s for s in systems if s.name == BASELINE or s.name in names], unavailable


def _prepare(systems: list[System], cache: Path, unavailable: dict[str, str]) -> list[System]:
    """The systems whose prepare() succeeded; the reasons of the others go into ``unavailable``."""
    ready = []
    for system in systems:
        started = time.monotonic()
        reason = _prepare_one(system, cache)
        if reason is None:
            ready.append(system)
        else:
            unavailable[system.name] = f"not run: {reason}"
        status = "ready" if reason is None else f"not run: {reason}"
        log(f"{system.name}: {status} ({time.monotonic() - started:.1f} s)")
    return ready


def _prepare_one(system: System, cache: Path) -> str | None:
    try:
        system.prepare(cache)
    except Unavailable as exc:
        return str(exc) or type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - a peer's bug: report it, run the others
        return f"prepare failed: {type(exc).__name__}: {exc}"
    return None


def _describe(system: System) -> dict:
    try:
        version = system.version()
    except Exception as exc:  # noqa: BLE001
        version = f"unknown ({exc})"
    return {"name": system.name, "description": system.description, "version": version}


def _interleave(bench: Bench, systems: list[System], loads: list[Load], repeats: int,
                dropped: dict[str, str]) -> list[Sample]:
    """Every system under every load, A B C A B C; a system failing twice in a row is dropped."""
    samples: list[Sample] = []
    counts: dict[tuple[str, str], int] = {}
    failures = dict.fromkeys((s.name for s in systems), 0)
    total = len(loads) * repeats * len(systems)
    for load in loads:
        for repeat in range(repeats):
            for system in systems:
                if system.name in dropped:
                    continue
                key = (system.name, load.name)
                sample = measure(bench, system, load, repeat, counts.get(key))
                samples.append(sample)
                log(f"[{len(samples)}/{total}] {_progress(sample)}")
                failures[system.name] = 0 if sample.ok else failures[system.name] + 1
                if sample.ok:
                    counts[key] = next_count(bench, load, sample)
                elif failures[system.name] >= MAX_FAILURES_IN_A_ROW:
                    dropped[system.name] = f"dropped after {MAX_FAILURES_IN_A_ROW} failed measurements in a row"
                    log(f"{system.name}: {dropped[system.name]}")
    return samples


def _progress(s: Sample) -> str:
    head = f"{s.system} {s.load} #{s.repeat + 1}:"
    if not s.ok:
        return f"{head} FAILED {s.error}"
    cpu = "" if s.cpu_seconds is None else f", {1000 * s.cpu_seconds / s.messages:.3f} ms CPU/msg"
    return f"{head} {s.messages} msgs in {s.seconds:.2f} s = {s.messages / s.seconds:,.0f} msgs/s{cpu}"


def _meta(opts: Options, started: float) -> dict:
    return {
        "command": opts.command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "duration_seconds": round(time.time() - started, 1),
        "cpus": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "repeats": opts.repeats,
        "target_seconds": opts.seconds,
    }


def run_compare(opts: Options) -> report.Results:
    """Run everything, write the results folder, return the results."""
    started = time.time()
    tools = postfix.unpack(opts.cache)
    systems, unavailable = select_systems(opts.systems)
    systems = _prepare(systems, opts.cache, unavailable)
    samples = _run_systems(opts, tools, systems, unavailable)
    log("micro-benchmark of the protocol core")
    micro = run_micro(opts.micro_seconds, opts.micro_repeats)
    idle: IdleResult | None = None
    if opts.idle:
        log(f"memory per idle session: {opts.idle_sessions} sessions, {opts.repeats} repeat(s)")
        idle = run_idle(opts.idle_sessions, opts.repeats)
    names = [s.name for s in systems]
    results = report.Results(_meta(opts, started), opts.loads, [_describe(s) for s in systems], unavailable,
                             summarize(samples, names, opts.loads), samples, micro, idle)
    report.write(results, opts.results)
    try:
        plots.write_plots(results.summaries, opts.loads, names, opts.results)
    except ImportError as exc:
        log(f"plots skipped: {exc} (install the bench extra: pip install -e '.[bench]')")
    return results


def _run_systems(opts: Options, tools: postfix.Tools, systems: list[System],
                 dropped: dict[str, str]) -> list[Sample]:
    workroot = Path(tempfile.mkdtemp(prefix="vipd-bench-"))
    sinks = Sinks(tools, workroot)
    samples: list[Sample] = []
    try:
        sinks.start()
        log(f"sinks on {', '.join(map(str, sinks.endpoints))}; work files in {workroot}")
        samples = _interleave(Bench(tools, sinks, workroot, opts.seconds, opts.keep_workdirs), systems,
                              opts.loads, opts.repeats, dropped)
    finally:
        sinks.stop()
        if opts.keep_workdirs or any(not s.ok for s in samples):
            log(f"work files kept in {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)
    return samples
