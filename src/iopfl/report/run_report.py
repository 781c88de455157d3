"""report.md of one run: per-site tables (val-selected and last round), val-Dice curves, overlays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypedDict

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from iopfl.fileio import atomic_write_text
from iopfl.report.figures import save_figure
from iopfl.report.tables import models_table, regions_table
from iopfl.results import (
    GLOBAL,
    METRICS_FILE,
    PERSONALIZED,
    RESULTS_FILE,
    EvalLine,
    TrainLine,
    read_metrics,
    read_run_results,
)


class ContourStyle(TypedDict):
    label: str
    color: str
    linestyle: Literal["solid", "dashed"]


# Contours a reader tells apart at a glance, red-green colour blind too: truth solid cyan, prediction dashed magenta
TRUTH: ContourStyle = {"label": "ground truth", "color": "#00d8ff", "linestyle": "solid"}
PREDICTION: ContourStyle = {"label": "prediction", "color": "#ff3ccf", "linestyle": "dashed"}


def dice_text(dice: dict[str, float]) -> str:
    """``{region: Dice}`` of a whole case as one line: "case Dice 87.3%", or "case Dice disc 91.2% ·
    cup 80.1%" for several regions."""
    if len(dice) == 1:
        return f"case Dice {100 * next(iter(dice.values())):.1f}%"
    return "case Dice " + " · ".join(f"{region} {100 * d:.1f}%" for region, d in dice.items())


def overlay_figure(
    image: np.ndarray,
    gt: np.ndarray | None,
    pred: np.ndarray,
    title: str,
    model: str,
    dice: dict[str, float] | None = None,
) -> plt.Figure:
    """Image ``[H, W]`` with truth and prediction contours (``[H, W]`` labels, foreground > 0), a legend
    of the two, and a title: ``title`` (the case) above the model and the case's Dice per region
    (``dice``, when scored)."""
    fig, ax = plt.subplots(figsize=(3.2, 3.6), dpi=100)
    ax.imshow(image, cmap="gray")
    for mask, style in ((gt, TRUTH), (pred, PREDICTION)):
        if mask is not None and mask.any():
            ax.contour(mask > 0, levels=[0.5], colors=style["color"], linestyles=style["linestyle"], linewidths=1.2)
    handles = [
        Line2D([], [], color=s["color"], linestyle=s["linestyle"], label=s["label"])
        for s in ((TRUTH, PREDICTION) if gt is not None else (PREDICTION,))
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    ax.set_title(f"{title}\n{model}" + (f" · {dice_text(dice)}" if dice else ""), fontsize=8)
    ax.axis("off")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_val_dice(lines: list[TrainLine | EvalLine], path: Path) -> bool:
    """Val Dice per round per site: personalised solid, global dashed. False when nothing to plot."""
    val = [x for x in lines if isinstance(x, EvalLine) and x.split == "val"]
    if not val:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    sites = sorted({x.site for x in val})
    colours = plt.get_cmap("tab10")
    for i, site in enumerate(sites):
        for model, style in ((PERSONALIZED, "-"), (GLOBAL, "--")):
            pts = sorted((x.round, x.dice) for x in val if x.site == site and x.model == model)
            if pts:
                r, d = zip(*pts, strict=True)
                ax.plot(r, [100 * v for v in d], style, color=colours(i % 10), label=f"{site} {model}")
    ax.set_xlabel("round")
    ax.set_ylabel("val Dice %")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def write_run_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    results = read_run_results(run_dir / RESULTS_FILE)
    lines = read_metrics(run_dir / METRICS_FILE)
    parts = [f"# {results.method} on {results.dataset} (seed {results.seed})\n"]
    if results.federated is False:
        parts.append("_Not federated learning: a reference point, not a competitor._\n")
    unit = results.units.get("hd95", "mm")
    parts.append(f"Distances (HD95, ASSD) in {unit}, on each case's original grid.\n")
    parts.append("## Test, val-selected models\n")
    parts.append(models_table(results.models))
    if regions_table(results.models):
        parts.append("\n" + regions_table(results.models))
    parts.append(f"\nSelected rounds: `{json.dumps(results.selection)}`\n")
    if results.last_round is not None:
        parts.append(f"\n## Test, last round ({results.last_round.round})\n")
        parts.append(models_table(results.last_round.models))
    if results.outside is not None:
        parts.append(f"\n## Outside: unseen site {results.outside.target}\n")
        parts.append(models_table(results.outside.models))
    if plot_val_dice(lines, run_dir / "plots" / "val_dice.png"):
        parts.append("\n## Validation Dice per round\n\n![val dice](plots/val_dice.png)\n")
    overlays = sorted((run_dir / "plots" / "overlays").glob("*.png"))
    if overlays:
        parts.append("\n## Predictions (solid cyan: ground truth, dashed magenta: prediction; the case's Dice)\n\n")
        parts.append(" ".join(f"![{p.stem}](plots/overlays/{p.name})" for p in overlays) + "\n")
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(parts))
    return out
