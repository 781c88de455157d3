"""What the commands show in the terminal: the training progress bar and the results table (rich)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table


class RichProgress:
    """Round/client progress bar with the last loss and the last mean val Dice."""

    def __init__(self, console: Console):
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        self.task: TaskID | None = None  # set by start
        self.val = "val dice —"

    def start(self, total_rounds: int, first_round: int, trainers_per_round: int) -> None:
        self.bar.start()
        done = (first_round - 1) * trainers_per_round
        self.task = self.bar.add_task("training", total=total_rounds * trainers_per_round, completed=done, status="")

    def client_done(self, round_: int, site: str, loss: float) -> None:
        assert self.task is not None, "client_done before start"
        self.bar.update(
            self.task, advance=1, description=f"round {round_}", status=f"{site} loss {loss:.3f} | {self.val}"
        )

    def round_done(self, round_: int, val_dice: dict[str, float]) -> None:
        values = [v for v in val_dice.values() if not math.isnan(v)]
        if values:
            self.val = f"val dice {100 * sum(values) / len(values):.1f}"

    def stop(self) -> None:
        self.bar.stop()


def results_table(results: dict[str, Any], selection: str = "val-selected") -> Table:
    """Per-site Dice / HD95 / ASSD of every model in ``results`` (val-selected by default)."""
    models = results["models"] if selection == "val-selected" else results["last_round"]["models"]
    table = Table(title=f"{results['method']} on {results['dataset']} — test, {selection}")
    table.add_column("model")
    table.add_column("site")
    unit = results.get("units", {}).get("hd95", "mm")
    for col in ("Dice %", f"HD95 {unit}", f"ASSD {unit}"):
        table.add_column(col, justify="right")
    for name, entry in models.items():
        rows = list(entry["sites"].items()) + [("mean", entry["mean"])]
        for site, m in rows:
            table.add_row(name, site, f"{100 * m['dice']:.2f}", f"{m['hd95']:.2f}", f"{m['assd']:.2f}")
    return table
