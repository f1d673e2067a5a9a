"""The results of a run as files: ``latest.json`` (everything, every sample) and ``latest.md`` (tables).

Rules: the Markdown is written from the same ``Results`` as the JSON; every figure is shown as
"median (min–max)" over the repeats; a figure that does not apply is "n/a", a missing one "—";
systems that could not run are listed with their reason, failed measurements with their error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .idle import IdleResult
from .loads import Load
from .measure import Sample
from .micro import MicroResult
from .stats import BASELINE, Spread, Summary

__all__ = ["Results", "write", "markdown", "micro_table", "idle_table"]

NA, MISSING = "n/a", "—"


@dataclass
class Results:
    meta: dict
    loads: list[Load]
    systems: list[dict]                     # name, description, version (those that ran)
    unavailable: dict[str, str] = field(default_factory=dict)
    summaries: list[Summary] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    micro: MicroResult | None = None
    idle: IdleResult | None = None          # None: not measured (compare --smoke)

    def to_json(self) -> dict:
        return {
            "meta": self.meta,
            "loads": [{"name": load.name, "label": load.label, "size_kib": load.size_kib,
                       "sessions": load.sessions, "many_per_connection": load.many} for load in self.loads],
            "systems": self.systems,
            "unavailable": self.unavailable,
            "results": [s.to_json() for s in self.summaries],
            "samples": [s.to_json() for s in self.samples],
            "micro": self.micro.to_json() if self.micro else None,
            "idle": self.idle.to_json() if self.idle else None,
        }


def write(results: Results, folder: Path) -> tuple[Path, Path]:
    """Write ``latest.json`` and ``latest.md`` into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "latest.json", folder / "latest.md"
    json_path.write_text(json.dumps(results.to_json(), indent=2) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path


def markdown(results: Results) -> str:
    parts = [_heading(results), _main_table(results), _problems(results), _systems_table(results)]
    if results.micro is not None:
        parts.append(micro_table(results.micro))
    if results.idle is not None:
        parts.append(idle_table(results.idle))
    return "\n\n".join(p for p in parts if p) + "\n"


def _heading(results: Results) -> str:
    m = results.meta
    return (f"# vipd bench: {m['command']}\n\n"
            f"{m['started']}, {m['cpus']} CPUs, {m['kernel']}; {m['repeats']} repeat(s) of about "
            f"{m['target_seconds']:g} s per system and load, interleaved. Figures: median (min–max) over the "
            f"repeats. CPU and memory are the relay's own process tree; baseline = smtp-source straight to a "
            f"sink. See bench/README.md for what each figure means.")


def _main_table(results: Results) -> str:
    loads = {load.name: load for load in results.loads}
    rows = ["| Load | System | msgs/s | × baseline | CPU ms/msg | peak RSS MiB | added latency ms |",
            "|---|---|--:|--:|--:|--:|--:|"]
    for s in results.summaries:
        load = loads[s.load]
        rows.append("| " + " | ".join([load.label, s.system, *_cells(s, load)]) + " |")
    return "\n".join(rows)


def _cells(s: Summary, load: Load) -> list[str]:
    if s.runs == 0:
        return ["failed", MISSING, MISSING, MISSING, MISSING]
    own = s.system != BASELINE
    return [
        _spread(s.msgs_per_s, "{:,.0f}"),
        _ratio(s.ratio),
        _spread(s.cpu_ms_per_msg, "{:.3g}") if own else NA,
        _spread(s.peak_rss_mib, "{:.0f}") if own else NA,
        _latency(s, load),
    ]


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return MISSING
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"


def _latency(s: Summary, load: Load) -> str:
    if load.sessions != 1 or s.system == BASELINE:
        return NA
    return MISSING if s.added_latency_ms is None else f"{s.added_latency_ms:+.3f}"


def _spread(spread: Spread | None, fmt: str) -> str:
    if spread is None:
        return MISSING
    return f"{fmt.format(spread.median)} ({fmt.format(spread.min)}–{fmt.format(spread.max)})"


def _problems(results: Results) -> str:
    lines = [f"- **{name}** {reason}" for name, reason in results.unavailable.items()]
    for s in results.summaries:
        lines += [f"- **{s.system}** {s.load}: {error}" for error in s.errors]
    return "Problems:\n\n" + "\n".join(lines) if lines else ""


def _systems_table(results: Results) -> str:
    rows = ["| System | Version | What |", "|---|---|---|"]
    rows += [f"| {s['name']} | {s['version'] or MISSING} | {s['description']} |" for s in results.systems]
    return "## Systems\n\n" + "\n".join(rows)


def micro_table(micro: MicroResult) -> str:
    rows = ["| Figure | median | min | max |", "|---|--:|--:|--:|"]
    for label, spread, fmt in [("commands/s (MAIL, RCPT, RSET pipelined)", micro.commands_per_s, "{:,.0f}"),
                               ("DATA MB/s (100 KiB bodies, 64 KiB reads)", micro.data_mb_per_s, "{:,.1f}"),
                               ("1 KiB transactions/s", micro.messages_per_s, "{:,.0f}")]:
        rows.append(f"| {label} | " + " | ".join(fmt.format(v) for v in (spread.median, spread.min, spread.max))
                    + " |")
    return "## Protocol core alone (`python -m bench micro`, vipd.smtp.server.ServerConnection)\n\n" + "\n".join(rows)


def idle_table(idle: IdleResult) -> str:
    """The idle-session section: figures, whether the goal is met, and failed repeats."""
    ok = sum(1 for s in idle.samples if s.ok)
    head = (f"## Memory per idle session (`python -m bench idle`, vipd-1w)\n\n"
            f"vipd's VmRSS before and after {idle.sessions:,} client connections were opened and held, each "
            f"greeted and answered to `EHLO idle.test`; {ok} of {idle.repeats} repeat(s), vipd started afresh each "
            f"time. Goal: at most {idle.goal_kib:g} KiB per session.")
    rows = ["| Figure | median | min | max |", "|---|--:|--:|--:|"]
    for label, spread, fmt in [("KiB per session", idle.kib_per_session, "{:,.2f}"),
                               (f"MiB added for {idle.sessions:,} sessions", idle.total_mib, "{:,.2f}"),
                               ("VmRSS MiB before", idle.rss_before_mib, "{:,.1f}"),
                               ("VmRSS MiB with the sessions open", idle.rss_after_mib, "{:,.1f}")]:
        cells = [MISSING] * 3 if spread is None else [fmt.format(v) for v in (spread.median, spread.min, spread.max)]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if idle.meets_goal is None:
        verdict = f"Goal ({idle.goal_kib:g} KiB per session): not measured."
    else:
        verdict = (f"Goal ({idle.goal_kib:g} KiB per session): **{'met' if idle.meets_goal else 'missed'}** "
                   f"(median {idle.kib_per_session.median:.2f} KiB).")
    errors = "".join(f"\n- {error}" for error in idle.errors)
    return head + "\n\n" + "\n".join(rows) + "\n\n" + verdict + (f"\n\nProblems:\n{errors}" if errors else "")
