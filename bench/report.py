"""The results of a run as files: ``latest.json`` (everything, every sample) and ``latest.md`` (tables).

Rules: the Markdown is written from the same ``Results`` as the JSON; every figure is shown as
"median (min–max)" over the repeats; a figure that does not apply is "n/a", a missing one "—";
systems that could not run are listed with their reason, failed measurements with their error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .loads import Load
from .measure import Sample
from .micro import MicroResult
from .stats import BASELINE, Spread, Summary

__all__ = ["Results", "write", "markdown", "micro_table"]

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
