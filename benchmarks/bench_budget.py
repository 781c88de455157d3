"""Quality against cost for FedAvg on the real polyp sites: one run per training budget (image size,
width, rounds, evaluation period...), each timed alone, scored on the original grid.

A finished budget is skipped when the script runs again (an interrupted one resumes from its
checkpoint, and its time is then the sum of its attempts as recorded in ``OUT/budget-times.json``).
Writes ``OUT/budget.json`` and ``OUT/budget.md``.

    python benchmarks/bench_budget.py [--budgets small medium] [--out benchmarks/results/quality-polyp]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from iopfl.config import CONFIG_DIR, build_config, read_yaml
from iopfl.engine.local import in_process_run
from iopfl.engine.rundir import RunDir
from iopfl.report.tables import markdown_table
from iopfl.results import GLOBAL, read_run_results

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# the augmentation and runtime of each row spelled out, so a row reruns as it ran whatever polyp.yaml holds
STANDARD = ["train.augment=standard", "train.aug_scale=0.15", "train.aug_rotate=15", "train.aug_intensity=0.2"]
FLIPS = ["train.augment=standard", "train.aug_scale=0", "train.aug_rotate=0", "train.aug_intensity=0"]
NO_AUG = ["train.augment=none"]
ONE_PROCESS = ["runtime.workers=1", "runtime.channels_last=false"]
TWO_WORKERS_CL = ["runtime.workers=2", "runtime.channels_last=true"]
BUDGETS: dict[str, list[str]] = {  # name: overrides of configs/polyp.yaml (FedAvg)
    "96px-w16-20r": [*STANDARD, *ONE_PROCESS, "data.image_size=96", "fl.rounds=20", "eval.eval_every=4"],
    "128px-w16-20r": [*STANDARD, *ONE_PROCESS, "data.image_size=128", "fl.rounds=20", "eval.eval_every=4"],
    "128px-w16-30r": [*STANDARD, *ONE_PROCESS, "data.image_size=128", "fl.rounds=30", "eval.eval_every=5"],
    "160px-w16-20r": [*STANDARD, *ONE_PROCESS, "data.image_size=160", "fl.rounds=20", "eval.eval_every=4"],
    "128px-w24-20r": [
        *STANDARD,
        *ONE_PROCESS,
        "data.image_size=128",
        "model.width=24",
        "fl.rounds=20",
        "eval.eval_every=4",
    ],
    "128px-w16-30r-noaug": [*NO_AUG, *ONE_PROCESS, "data.image_size=128", "fl.rounds=30", "eval.eval_every=10"],
    "128px-w16-50r-noaug-2w": [
        *NO_AUG,
        "runtime.workers=2",
        "runtime.channels_last=false",
        "data.image_size=128",
        "fl.rounds=50",
        "eval.eval_every=10",
    ],
    "128px-w16-50r-flips-2w-cl": [*FLIPS, *TWO_WORKERS_CL, "data.image_size=128", "fl.rounds=50", "eval.eval_every=10"],
    "160px-w16-36r-flips-2w-cl": [*FLIPS, *TWO_WORKERS_CL, "data.image_size=160", "fl.rounds=36", "eval.eval_every=12"],
    "128px-w16-20r-noaug": [
        *NO_AUG,
        *ONE_PROCESS,
        "data.image_size=128",
        "fl.rounds=20",
        "eval.eval_every=4",
        "train.lr_schedule=constant",
        "train.ce_weight=0",
    ],
}


def run_budget(name: str, out: Path, extra: list[str], times: dict[str, float]) -> dict:
    cfg = build_config(
        read_yaml(CONFIG_DIR / "polyp.yaml"),
        [f"data.root={SHARED}", "fl.method=fedavg", *BUDGETS[name], *extra],
        origin="polyp.yaml",
    )
    run_dir = out / "budget" / name
    if not RunDir(run_dir).results.exists():
        t0 = time.perf_counter()
        try:
            in_process_run(cfg, run_dir).run(resume=RunDir(run_dir).checkpoint.exists())
        finally:
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
            (out / "budget-times.json").write_text(json.dumps(times, indent=1))
    results = read_run_results(RunDir(run_dir).results)
    entry = results.models[GLOBAL]
    return {
        "overrides": BUDGETS[name] + extra,
        "minutes": times.get(name, float("nan")) / 60,
        "selected_round": results.selection[GLOBAL],
        "test_dice": {s: v.dice for s, v in entry.sites.items()},
        "mean_dice": entry.mean.dice,
        "last_round_mean_dice": results.last_round.models[GLOBAL].mean.dice,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "quality-polyp")
    parser.add_argument("-o", "--override", action="append", default=[], help="config key=value for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    times_file = args.out / "budget-times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    rows = {}
    for name in args.budgets:
        rows[name] = run_budget(name, args.out, args.override, times)
        print(f"{name}: {100 * rows[name]['mean_dice']:.2f} % in {rows[name]['minutes']:.1f} min", flush=True)
    (args.out / "budget.json").write_text(json.dumps(rows, indent=1))
    sites = list(next(iter(rows.values()))["test_dice"])
    table = [
        [
            name,
            *(f"{100 * r['test_dice'][s]:.2f}" for s in sites),
            f"{100 * r['mean_dice']:.2f}",
            f"{100 * r['last_round_mean_dice']:.2f}",
            str(r["selected_round"]),
            f"{r['minutes']:.1f}",
        ]
        for name, r in rows.items()
    ]
    text = (
        "# FedAvg on the polyp sites: test Dice % (original grid) of the val-selected global model\n\n"
        + markdown_table(["budget", *sites, "mean", "last round mean", "selected round", "minutes"], table)
    )
    (args.out / "budget.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
