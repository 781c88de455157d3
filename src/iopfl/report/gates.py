"""What the router did: the mean gate of every expert in every routed layer, as JSON and a heat map."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from iopfl.fileio import atomic_write_text
from iopfl.report.figures import save_figure


def write_gates(summary: dict, out_dir: Path) -> tuple[Path, Path]:
    """``out_dir/gates.json`` (the summary as is) and ``out_dir/gates.png`` (layers × experts).

    ``summary``: ``{"layers": [L names], "experts": [E names], "mean_gates": [L][E]}``
    (``IOPFLRouting.gate_summary``), with ``"safeguard"`` (the fallback summary) when it watched.
    """
    out_dir = Path(out_dir)
    json_path, png_path = out_dir / "gates.json", out_dir / "gates.png"
    atomic_write_text(json_path, json.dumps(summary, indent=1) + "\n")
    gates = np.asarray(summary["mean_gates"], dtype=float)
    layers, experts = summary["layers"], summary["experts"]
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(experts), 1.2 + 0.28 * len(layers)), dpi=100)
    # a fixed 0..1 scale, so heat maps of different sites and runs can be compared by eye
    image = ax.imshow(gates, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(experts)), experts, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    for (i, j), value in np.ndenumerate(gates):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black" if value > 0.6 else "white")
    ax.set_xlabel("expert")
    title = "mean gate per routed layer"
    guard = summary.get("safeguard")
    if guard:  # the safeguard's fallbacks belong next to what the router did
        title += f"\nsafeguard: {guard['fallbacks']} of {guard['batches']} batches fell back"
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    fig.tight_layout()
    save_figure(fig, png_path)
    return json_path, png_path
