"""``iopfl train`` and ``iopfl demo``: training runs on this machine with a progress display, and the demo."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from iopfl.commands.terminal import RichProgress, results_table
from iopfl.config import CONFIG_DIR, Config, build_config, read_yaml
from iopfl.data.synthetic import SITE_NAMES
from iopfl.engine.local import in_process_run
from iopfl.engine.rundir import RunDir
from iopfl.report.run_report import write_run_report
from iopfl.report.tables import models_table
from iopfl.results import OutsideEntry, read_run_results, write_results


def train_run(cfg: Config, run_dir: Path, resume: bool = False, console: Console | None = None) -> dict:
    """Train in-process (results.json, experts, overlays and report.md written); return the results."""
    progress = RichProgress(console or Console(stderr=True))
    try:
        return in_process_run(cfg, run_dir, progress).run(resume=resume)
    finally:
        progress.stop()


def demo_config(overrides: list[str]) -> Config:
    return build_config(read_yaml(CONFIG_DIR / "demo.yaml"), overrides, origin="demo.yaml")


def run_demo(out: Path, overrides: list[str], console: Console | None = None) -> dict[str, dict]:
    """Inside: FedAvg and IOP-FL on every synthetic site. Outside: IOP-FL trained without the
    demo's held-out site, then every adaptation method on that site. Prints and writes the tables."""
    from iopfl.commands.adapt import adapt_cases, adapt_runtime, method_names, target_cases
    from iopfl.commands.runs import open_run
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
    outside = adapt_cases(
        run, target_cases(run, target), method_names("all"), holdout_dir / "outside", run.cfg, adapt_runtime(run.cfg)
    ).models
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
