"""What the CLI commands run: a training run with a progress display, its report, and the demo."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from iopfl import CONFIG_DIR
from iopfl.config import Config, build_config, read_yaml
from iopfl.data.synthetic import SITE_NAMES
from iopfl.engine.inprocess import in_process_run
from iopfl.engine.rundir import RunDir
from iopfl.report.run_report import write_run_report
from iopfl.report.tables import models_table
from iopfl.results import OutsideEntry, read_run_results, write_results


class RichProgress:
    """Round/client progress bar with the last loss and the last mean val Dice."""

    def __init__(self, console: Console):
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console,
                            transient=False)
        self.task = None
        self.val = "val dice —"

    def start(self, total_rounds: int, first_round: int, trainers_per_round: int) -> None:
        self.bar.start()
        done = (first_round - 1) * trainers_per_round
        self.task = self.bar.add_task("training", total=total_rounds * trainers_per_round, completed=done,
                                      status="")

    def client_done(self, round_: int, site: str, loss: float) -> None:
        self.bar.update(self.task, advance=1, description=f"round {round_}",
                        status=f"{site} loss {loss:.3f} | {self.val}")

    def round_done(self, round_: int, val_dice: dict[str, float]) -> None:
        values = [v for v in val_dice.values() if not math.isnan(v)]
        if values:
            self.val = f"val dice {100 * sum(values) / len(values):.1f}"

    def stop(self) -> None:
        self.bar.stop()


def train_run(cfg: Config, run_dir: Path, resume: bool = False, console: Console | None = None) -> dict:
    """Train in-process (results.json, experts, overlays and report.md written); return the results."""
    progress = RichProgress(console or Console(stderr=True))
    try:
        return in_process_run(cfg, run_dir, progress).run(resume=resume)
    finally:
        progress.stop()


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


def demo_config(overrides: list[str]) -> Config:
    return build_config(read_yaml(CONFIG_DIR / "demo.yaml"), overrides, origin="demo.yaml")


def run_demo(out: Path, overrides: list[str], console: Console | None = None) -> dict[str, dict]:
    """Inside: FedAvg and IOP-FL on every synthetic site. Outside: IOP-FL trained without the
    demo's held-out site, then every adaptation method on that site. Prints and writes the tables."""
    from iopfl.engine.outside import adapt_cases, method_names, open_run, target_cases
    from iopfl.report.compare import compare_runs

    console = console or Console(stderr=True)
    results = {}
    for method in ("fedavg", "iopfl"):
        results[method] = _demo_run(out / method, [f"fl.method={method}", *overrides], console)
    compare_runs([out / m for m in ("fedavg", "iopfl")], out / "report.md")

    base = demo_config(overrides)
    target = base.data.holdout or SITE_NAMES[base.data.synthetic.sites - 1]
    holdout_dir = out / f"iopfl-without-{target}"
    _demo_run(holdout_dir, ["fl.method=iopfl", f"data.holdout={target}", *overrides], console)
    console.rule(f"[bold]outside: adapting to unseen {target}")
    run = open_run(holdout_dir)
    outside = adapt_cases(run, target_cases(run, target), method_names("all"), holdout_dir / "outside", run.cfg)
    inside = read_run_results(RunDir(holdout_dir).results)
    inside.outside = OutsideEntry.model_validate({"target": target, "models": outside})
    write_results(RunDir(holdout_dir).results, inside)
    write_run_report(holdout_dir)
    with (out / "report.md").open("a") as fh:
        fh.write(f"\n## Outside: unseen site {target} (experts trained on the other sites)\n\n")
        fh.write(models_table(inside.outside.models))
    print((out / "report.md").read_text())
    console.print(f"demo written to {out}")
    return {**results, "outside": outside}


def _demo_run(run_dir: Path, overrides: list[str], console: Console) -> dict:
    cfg = demo_config(overrides)
    console.rule(f"[bold]{run_dir.name}")
    results = train_run(cfg, run_dir, resume=RunDir(run_dir).checkpoint.exists(), console=console)
    Console().print(results_table(results))
    return results
