"""Draws the switched designs (conf/*/topology.toml) as PNG pictures in docs/img: python docs/diagrams.py

Generated from the same files the lab and the end-to-end tests run, so the pictures cannot drift from
what runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vipd.topology import load_scenario, scenario_names  # noqa: E402

OUT = Path(__file__).resolve().parent / "img"
ROLE_COLOUR = {"incoming": "#cfe2ff", "content": "#ffe5b4", "content+delivery": "#ffd6a5", "delivery": "#d1f2d1"}


def box(ax, x, y, w, h, text, colour="#ffffff", bold=False):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02", fc=colour, ec="#333"))
    ax.text(x, y, text, ha="center", va="center", fontsize=8, weight="bold" if bold else "normal")


def arrow(ax, x0, y0, x1, y1):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "->", "color": "#333"})


def draw(name: str) -> Path:
    topo = load_scenario(name)
    layers = topo.layers
    width = 2.2 * (len(layers) + 2)
    fig, ax = plt.subplots(figsize=(width, 4.2))
    ax.set_xlim(0, len(layers) + 2)
    ax.set_ylim(0, 4.2)
    ax.axis("off")
    box(ax, 0.5, 2.6, 0.8, 0.5, "Internet\nclients")
    box(ax, 0.5, 0.8, 0.8, 0.5, "internal\nhosts")
    prev = (0.9, 2.6)
    for i, layer in enumerate(layers, start=1):
        x = i + 0.5
        box(ax, x, 3.5, 0.85, 0.4, f"VIP {layer.name}\n(vipd)", "#eeeeee", bold=True)
        for k in range(len(layer.servers)):
            scan = f"\n({layer.scanner})" if layer.scanner else ""
            box(ax, x, 2.6 - 0.7 * k, 0.85, 0.5, f"{layer.name}-{k + 1}\n{layer.role}{scan}", ROLE_COLOUR[layer.role])
            arrow(ax, x, 3.28, x, 2.85 - 0.7 * k)
        arrow(ax, prev[0], prev[1], x - 0.43, 3.5)
        prev = (x + 0.43, 2.6 - 0.35)
        if layer.name == "content":
            arrow(ax, 0.9, 0.8, x - 0.43, 3.45)
    end = len(layers) + 1.5
    box(ax, end, 2.9, 0.85, 0.45, "internal\ngateway", "#e0e0ff")
    box(ax, end, 1.7, 0.85, 0.45, "Internet\n(outbound)", "#e0e0ff")
    arrow(ax, prev[0], prev[1], end - 0.43, 2.9)
    arrow(ax, prev[0], prev[1], end - 0.43, 1.7)
    ax.set_title(f"{name}: {topo.description}", fontsize=10)
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    for scenario in scenario_names():
        print(draw(scenario))
