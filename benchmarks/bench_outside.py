"""Outside routing settings: gate normalisation (raw sigmoid vs. divided by the sum: docs/METHOD.md §2 asks to
measure both), the shape weight λ_S, and passes over the site's images — against BN-adapt, the best
simple baseline, on the same experts and batches.

Reuses the hold-out runs of ``bench_quality.py`` (``OUT/outside/without-<site>-s<seed>``: IOP-FL trained
without that site), so run that first. Writes ``OUT/outside-sweep.json`` and ``.md``.

    python benchmarks/bench_outside.py --out benchmarks/results/quality-synthetic [--seeds 1]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from iopfl.config import load_config
from iopfl.engine.outside import adapt_cases, open_run, target_cases, test_case_ids
from iopfl.engine.rundir import RunDir
from iopfl.report.compare import cell
from iopfl.report.tables import markdown_table

# name: (method, adapt overrides); the first iopfl row is the default configuration
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "bn (reference)": ("bn", []),
    "iopfl sigmoid, λ_S=1, 1 pass (default)": ("iopfl", []),
    "iopfl sum, λ_S=1, 1 pass": ("iopfl", ["adapt.gate_norm=sum"]),
    "iopfl sigmoid, λ_S=0, 1 pass": ("iopfl", ["adapt.lambda_shape=0"]),
    "iopfl sum, λ_S=0, 1 pass": ("iopfl", ["adapt.gate_norm=sum", "adapt.lambda_shape=0"]),
    "iopfl sigmoid, λ_S=1, 3 passes": ("iopfl", ["adapt.passes=3"]),
    "iopfl sum, λ_S=1, 3 passes": ("iopfl", ["adapt.gate_norm=sum", "adapt.passes=3"]),
}
RUN_NAME = re.compile(r"^without-(.+)-s(\d+)$")


def hold_out_runs(out: Path, seeds: int) -> list[tuple[str, int, Path]]:
    """(target, seed, run dir) of every finished hold-out run with seed < ``seeds``, in name order."""
    found = []
    for run_dir in sorted((out / "outside").iterdir()):
        m = RUN_NAME.match(run_dir.name)
        if m and int(m[2]) < seeds and RunDir(run_dir).results.exists():
            found.append((m[1], int(m[2]), run_dir))
    if not found:
        raise SystemExit(f"no finished hold-out runs under {out / 'outside'}: run bench_quality.py first")
    return found


def sweep(runs: list[tuple[str, int, Path]]) -> dict[str, dict]:
    """``{"scores": {setting: {target: [Dice per seed]}}, "seconds": {setting: total seconds}}``."""
    scores: dict[str, dict[str, list[float]]] = {name: {} for name in SETTINGS}
    seconds = dict.fromkeys(SETTINGS, 0.0)
    for target, seed, run_dir in runs:
        run = open_run(run_dir)
        cases = target_cases(run, target)
        scored = test_case_ids(run.cfg, target)  # the rows of bench_quality's outside table: the test split
        for name, (method, overrides) in SETTINGS.items():
            cfg = load_config(run_dir / "config.yaml", [f"adapt.seed={seed}", *overrides])
            t0 = time.perf_counter()
            dice = adapt_cases(run, cases, [method], None, cfg, scored)[method]["mean"]["dice"]
            seconds[name] += time.perf_counter() - t0
            scores[name].setdefault(target, []).append(dice)
            print(f"{target} seed {seed} {name}: {100 * dice:.2f}", flush=True)
    return {"scores": scores, "seconds": seconds}


def write_tables(result: dict, out: Path) -> None:
    scores, seconds = result["scores"], result["seconds"]
    targets = list(next(iter(scores.values())))
    rows = []
    for name, by_target in scores.items():
        means = [100 * np.mean(by_target[t]) for t in targets]
        cells = [cell(by_target[t], 100) for t in targets]
        rows.append([name, *cells, f"{np.mean(means):.2f}", f"{seconds[name]:.0f}"])
    (out / "outside-sweep.json").write_text(json.dumps(result, indent=1))
    (out / "outside-sweep.md").write_text(
        "# Outside routing settings: Dice % on each held-out site (mean ± std over seeds)\n\n"
        + markdown_table(["setting", *targets, "mean", "seconds"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a bench_quality.py output folder")
    parser.add_argument("--seeds", type=int, default=1, help="use the hold-out runs of the first N seeds")
    args = parser.parse_args()
    result = sweep(hold_out_runs(args.out, args.seeds))
    write_tables(result, args.out)
    print((args.out / "outside-sweep.md").read_text())


if __name__ == "__main__":
    main()
