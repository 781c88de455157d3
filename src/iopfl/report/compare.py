"""``iopfl report RUN...``: one table across runs — rows = method × model, columns = sites + mean —
with mean ± std over seeds when runs differ only by seed; markdown, CSV and a bar chart."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from iopfl.errors import UserError
from iopfl.fileio import atomic_write_text
from iopfl.fl import STRATEGIES
from iopfl.report.figures import save_figure
from iopfl.report.tables import COLUMNS, markdown_table
from iopfl.results import RESULTS_FILE, ModelEntry, Results, RunResults, read_results

SELECTIONS = ("val-selected", "last round")


def selected_models(results: Results, selection: str) -> dict[str, ModelEntry]:
    """The models of one selection: val-selected, or those of the last round (none when not recorded)."""
    if selection == "val-selected":
        return results.models
    last = results.last_round if isinstance(results, RunResults) else None
    return last.models if last else {}


def collect(runs: list[Path]) -> dict[str, dict[tuple[str, str], dict[str, dict[str, list[float]]]]]:
    """selection → (method, model) → site|"mean" → metric → values over seeds."""
    table: dict = {label: defaultdict(lambda: defaultdict(lambda: defaultdict(list))) for label in SELECTIONS}
    for run in runs:
        results = read_results(Path(run) / RESULTS_FILE)
        for label in SELECTIONS:
            for model, entry in selected_models(results, label).items():
                row = table[label][(results.method, model)]
                for site, scores in [*entry.sites.items(), ("mean", entry.mean)]:
                    for key, _, _ in COLUMNS:
                        row[site][key].append(float(getattr(scores, key)))
    return {label: dict(sorted(rows.items(), key=row_order)) for label, rows in table.items()}


def row_order(item: tuple[tuple[str, str], Any]) -> tuple[int, str, str]:
    """Methods in registry order (unknown ones last), so the order of the run arguments does not matter."""
    (method, model), _ = item
    order = list(STRATEGIES)
    return (order.index(method) if method in order else len(order), method, model)


def cell(values: list[float], scale: float) -> str:
    arr = scale * np.asarray(values, dtype=float)
    if len(arr) == 1:
        return f"{arr[0]:.2f}"
    return f"{arr.mean():.2f} ± {arr.std(ddof=1):.2f}"


def compare_runs(runs: list[Path], out: Path) -> dict:
    """Write ``out`` (markdown), ``out.csv`` and ``out.png``; return the collected table."""
    if not runs:
        raise UserError("iopfl report: give at least one run directory")
    table = collect(runs)
    md, csv_rows = ["# Comparison\n"], []
    for label in SELECTIONS:
        rows = table[label]
        if not rows:
            continue
        sites = [s for s in next(iter(rows.values())) if s != "mean"]
        for key, name, scale in COLUMNS:
            body = []
            for (method, model), by_site in rows.items():
                cells = [cell(by_site[s][key], scale) if by_site[s][key] else "—" for s in [*sites, "mean"]]
                body.append([f"{method} / {model}", *cells])
                csv_rows.append([label, name, method, model, *cells])
            md.append(f"\n## {name}, test, {label}\n\n" + markdown_table(["method / model", *sites, "mean"], body))
    out = Path(out)
    atomic_write_text(out, "\n".join(md))
    sheet = io.StringIO(newline="")
    csv.writer(sheet).writerows([["selection", "metric", "method", "model", "cells..."], *csv_rows])
    atomic_write_text(out.with_suffix(".csv"), sheet.getvalue())
    _bar_chart(table["val-selected"], out.with_suffix(".png"))
    return table


def _bar_chart(rows: dict, path: Path) -> None:
    labels = [f"{m}\n{k}" for m, k in rows]
    means = [100 * np.mean(v["mean"]["dice"]) for v in rows.values()]
    errs = [100 * np.std(v["mean"]["dice"], ddof=1) if len(v["mean"]["dice"]) > 1 else 0 for v in rows.values()]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(labels)), 3.5), dpi=100)
    ax.bar(range(len(labels)), means, yerr=errs, color="steelblue", capsize=3)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("mean test Dice % (val-selected)")
    fig.tight_layout()
    save_figure(fig, path)
