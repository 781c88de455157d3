"""report.md of one run: per-site tables (val-selected and last round), val-Dice curves, overlays."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from iopfl.fileio import atomic_write_text  # noqa: E402
from iopfl.report.tables import models_table, regions_table  # noqa: E402
from iopfl.results import GLOBAL, METRICS_FILE, PERSONALIZED, RESULTS_FILE, EvalLine, TrainLine  # noqa: E402
from iopfl.results import read_metrics, read_run_results  # noqa: E402


def save_overlay(path: Path, image: np.ndarray, gt: np.ndarray | None, pred: np.ndarray, title: str) -> None:
    """Image ``[H, W]`` with truth (green) and prediction (red) contours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(3.2, 3.2), dpi=100)
    ax.imshow(image, cmap="gray")
    if gt is not None and gt.any():
        ax.contour(gt > 0, levels=[0.5], colors="lime", linewidths=1)
    if pred.any():
        ax.contour(pred > 0, levels=[0.5], colors="red", linewidths=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_val_dice(lines: list[TrainLine | EvalLine], path: Path) -> bool:
    """Val Dice per round per site: personalised solid, global dashed. False when nothing to plot."""
    val = [x for x in lines if isinstance(x, EvalLine) and x.split == "val"]
    if not val:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    sites = sorted({x.site for x in val})
    colours = plt.get_cmap("tab10")
    for i, site in enumerate(sites):
        for model, style in ((PERSONALIZED, "-"), (GLOBAL, "--")):
            pts = sorted((x.round, x.dice) for x in val if x.site == site and x.model == model)
            if pts:
                r, d = zip(*pts)
                ax.plot(r, [100 * v for v in d], style, color=colours(i % 10), label=f"{site} {model}")
    ax.set_xlabel("round")
    ax.set_ylabel("val Dice %")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
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
        parts.append("\n## Predictions (green: truth, red: prediction)\n\n")
        parts.append(" ".join(f"![{p.stem}](plots/overlays/{p.name})" for p in overlays) + "\n")
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(parts))
    return out
