"""PNG bar charts of a run: ``msgs_per_s.png`` and ``cpu_per_msg.png`` next to latest.md.

One panel per load, one bar per system (the median), a whisker from min to max; each panel has
its own linear scale, so 1 KiB and 100 KiB loads both stay readable. A system with no value for a
figure anywhere (the baseline's CPU) gets no bar; each system keeps its colour in every plot.

Rules: matplotlib with the Agg backend (no display); figures are closed after saving.
"""

from __future__ import annotations

import math
from pathlib import Path

from .loads import Load
from .stats import Spread, Summary

__all__ = ["write_plots"]

_PLOTS = {
    "msgs_per_s.png": ("msgs_per_s", "messages/s (higher is better)"),
    "cpu_per_msg.png": ("cpu_ms_per_msg", "relay CPU ms per message (lower is better)"),
}


def write_plots(summaries: list[Summary], loads: list[Load], systems: list[str], folder: Path) -> list[Path]:
    """Write the PNGs into ``folder``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    paths = []
    for filename, (figure, title) in _PLOTS.items():
        paths.append(_plot(summaries, loads, systems, figure, title, folder / filename))
    return paths


def _plot(summaries: list[Summary], loads: list[Load], systems: list[str], figure: str, title: str,
          path: Path) -> Path:
    import matplotlib.pyplot as plt
    values = {(s.load, s.system): getattr(s, figure) for s in summaries}
    shown = [name for name in systems if any(values.get((load.name, name)) for load in loads)]
    palette = plt.get_cmap("tab10")
    colors = {name: palette(index % 10) for index, name in enumerate(systems)}    # the same in every plot
    cols = min(4, len(loads))
    rows = math.ceil(len(loads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 3.2 * rows + 0.8), squeeze=False)
    for ax, load in zip(axes.flat, loads):
        _panel(ax, load, [(name, values.get((load.name, name)), colors[name]) for name in shown])
    for ax in list(axes.flat)[len(loads):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _panel(ax, load: Load, bars: list[tuple[str, Spread | None, object]]) -> None:
    xs = range(len(bars))
    medians = [s.median if s else 0.0 for _, s, _ in bars]
    low = [s.median - s.min if s else 0.0 for _, s, _ in bars]
    high = [s.max - s.median if s else 0.0 for _, s, _ in bars]
    ax.bar(xs, medians, yerr=[low, high], capsize=3, color=[color for _, _, color in bars])
    ax.set_xticks(list(xs), [name for name, _, _ in bars], rotation=45, ha="right", fontsize=8)
    ax.set_title(load.label, fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
