"""Outside personalization settings, chosen where no reported result is: a study of the ``adapt.``
settings on one suite's held-out sites (``--part study``, run on the synthetic suite), and the chosen
defaults reported once, unchanged, on another suite (``--part defaults``, the polyp leave-one-site-out)
— against BN-adapt and TENT, on the same experts, batches and cases.

Reuses the hold-out runs of ``bench_quality.py`` (``OUT/outside/without-<site>-s<seed>``: IOP-FL trained
without that site), so run that first. Every row is scored on the held-out site's test split (as
``bench_quality``'s outside table), adaptation runs online over all of the site's images.
Writes ``OUT/outside-<part>.json`` and ``.md``; the study also names the setting with the best mean.

    python benchmarks/bench_outside.py --out benchmarks/results/quality-synthetic --part study [--jobs 2]
    python benchmarks/bench_outside.py --out benchmarks/results/quality-polyp --part defaults [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from iopfl.config import load_config
from iopfl.engine.outside import adapt_cases, open_run, target_cases, test_case_ids
from iopfl.engine.rundir import RunDir
from iopfl.report.compare import cell
from iopfl.report.tables import markdown_table

REFERENCES: dict[str, tuple[str, list[str]]] = {"bn": ("bn", []), "tent": ("tent", [])}
DEFAULTS: dict[str, tuple[str, list[str]]] = {**REFERENCES, "iopfl (defaults)": ("iopfl", [])}
# name: (method, adapt overrides). The first block spans gate initialisation x normalisation and the
# protocol; the second varies the objective and the optimiser around the global start.
STUDY: dict[str, tuple[str, list[str]]] = {
    **REFERENCES,
    "iopfl paper init, sigmoid": ("iopfl", ["adapt.gate_init=paper", "adapt.gate_norm=sigmoid"]),
    "iopfl paper init, sum": ("iopfl", ["adapt.gate_init=paper", "adapt.gate_norm=sum"]),
    "iopfl global init, sigmoid": ("iopfl", ["adapt.gate_init=global", "adapt.gate_norm=sigmoid"]),
    "iopfl global init, sum": ("iopfl", ["adapt.gate_init=global", "adapt.gate_norm=sum"]),
    "iopfl uniform init, sigmoid": ("iopfl", ["adapt.gate_init=uniform", "adapt.gate_norm=sigmoid"]),
    "iopfl uniform init, sum": ("iopfl", ["adapt.gate_init=uniform", "adapt.gate_norm=sum"]),
    "iopfl published protocol (10 passes)": ("iopfl", ["adapt.gate_init=paper", "adapt.protocol=published"]),
    "iopfl global, lr 1e-4": ("iopfl", ["adapt.gate_init=global", "adapt.lr=1e-4"]),
    "iopfl global, lr 3e-3": ("iopfl", ["adapt.gate_init=global", "adapt.lr=3e-3"]),
    "iopfl global, 3 steps per batch": ("iopfl", ["adapt.gate_init=global", "adapt.steps_per_batch=3"]),
    "iopfl global, 3 passes": ("iopfl", ["adapt.gate_init=global", "adapt.passes=3"]),
    "iopfl global, λ_S=0": ("iopfl", ["adapt.gate_init=global", "adapt.lambda_shape=0"]),
    "iopfl global, λ_C=1": ("iopfl", ["adapt.gate_init=global", "adapt.lambda_consistency=1"]),
    "iopfl global, λ_H=1": ("iopfl", ["adapt.gate_init=global", "adapt.lambda_entropy=1"]),
}
PARTS = {"study": STUDY, "defaults": DEFAULTS}
RUN_NAME = re.compile(r"^without-(.+)-s(\d+)$")


def hold_out_runs(out: Path, seeds: int) -> list[tuple[str, int, Path]]:
    """(target, seed, run dir) of every finished hold-out run with seed < ``seeds``, in name order."""
    found = []
    for run_dir in sorted((out / "outside").iterdir()) if (out / "outside").is_dir() else []:
        m = RUN_NAME.match(run_dir.name)
        if m and int(m[2]) < seeds and RunDir(run_dir).results.exists():
            found.append((m[1], int(m[2]), run_dir))
    if not found:
        raise SystemExit(f"no finished hold-out runs under {out / 'outside'}: run bench_quality.py first")
    return found


def adapt_one(target: str, seed: int, run_dir: Path, settings: dict[str, tuple[str, list[str]]]) -> dict:
    """Every setting on one hold-out run: ``{setting: (Dice, seconds)}``."""
    run = open_run(run_dir)
    cases = target_cases(run, target)
    scored = test_case_ids(run.cfg, target)
    out = {}
    for name, (method, overrides) in settings.items():
        cfg = load_config(run_dir / "config.yaml", [f"adapt.seed={seed}", *overrides])
        t0 = time.perf_counter()
        dice = adapt_cases(run, cases, [method], None, cfg, scored)[method]["mean"]["dice"]
        out[name] = (dice, time.perf_counter() - t0)
        print(f"{target} seed {seed} {name}: {100 * dice:.2f}", flush=True)
    return out


def sweep(runs: list[tuple[str, int, Path]], settings: dict, jobs: int) -> dict[str, dict]:
    """``{"scores": {setting: {target: [Dice per seed]}}, "seconds": {setting: total seconds}}``."""
    args = [(t, s, d, settings) for t, s, d in runs]
    if jobs == 1:
        results = [adapt_one(*a) for a in args]
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            results = list(pool.map(adapt_one, *zip(*args)))
    scores: dict[str, dict[str, list[float]]] = {name: {} for name in settings}
    seconds = dict.fromkeys(settings, 0.0)
    for (target, _, _), by_setting in zip(runs, results):
        for name, (dice, secs) in by_setting.items():
            scores[name].setdefault(target, []).append(dice)
            seconds[name] += secs
    return {"scores": scores, "seconds": seconds}


def best_iopfl(scores: dict[str, dict[str, list[float]]]) -> str:
    """The IOP-FL setting with the best mean over targets of the mean over seeds."""
    means = {n: np.mean([np.mean(v) for v in by_target.values()]) for n, by_target in scores.items()
             if n.startswith("iopfl")}
    return max(means, key=means.get)


def write_tables(result: dict, out: Path, part: str) -> None:
    scores, seconds = result["scores"], result["seconds"]
    targets = list(next(iter(scores.values())))
    rows = []
    for name, by_target in scores.items():
        means = [100 * np.mean(by_target[t]) for t in targets]
        cells = [cell(by_target[t], 100) for t in targets]
        rows.append([name, *cells, f"{np.mean(means):.2f}", f"{seconds[name]:.0f}"])
    result["best"] = best_iopfl(scores)
    (out / f"outside-{part}.json").write_text(json.dumps(result, indent=1))
    title = ("settings study (choose here)" if part == "study"
             else "the chosen defaults, reported without re-tuning")
    (out / f"outside-{part}.md").write_text(
        f"# Outside personalization, {title}: test-split Dice % of each held-out site (mean ± std over seeds)\n\n"
        + markdown_table(["setting", *targets, "mean", "seconds"], rows)
        + f"\nBest IOP-FL setting by mean: **{result['best']}**.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a bench_quality.py output folder")
    parser.add_argument("--part", choices=list(PARTS), required=True)
    parser.add_argument("--seeds", type=int, default=3, help="use the hold-out runs of the first N seeds")
    parser.add_argument("--jobs", type=int, default=1, help="hold-out runs adapted at a time")
    args = parser.parse_args()
    result = sweep(hold_out_runs(args.out, args.seeds), PARTS[args.part], args.jobs)
    write_tables(result, args.out, args.part)
    print((args.out / f"outside-{args.part}.md").read_text())


if __name__ == "__main__":
    main()
