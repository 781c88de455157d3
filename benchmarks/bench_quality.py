"""Quality benchmark: every inside method on a suite's sites, and (for suites with hold-outs) every
outside method on every held-out site, over several seeds; same model, data, budget and selection rule.

Inside: one record per (method, seed) under ``OUT/inside/<method>-s<seed>/`` (config.yaml, manifest.json,
results.json, metrics.jsonl, run.log; the weights stay in the work folder, benchmarks/records.py), so a
clone with the records trains nothing. Tables from the records alone: ``OUT/inside.md`` (+ ``.csv``,
``.png``: ``iopfl report``'s table) and ``OUT/inside-paired.md`` (+ ``.json``): each run's Dice minus the
FedAvg global model's of the same seed.
Outside: per held-out site and seed, IOP-FL is trained on the other sites and every adaptation method
is run on the held-out site's images (labels only for scoring) → ``OUT/outside.md`` (+ ``.json``), with
an oracle row (the site's own Local model: an upper bound, not an outside method).

    python benchmarks/bench_quality.py --suite synthetic --seeds 3 [--jobs 2] \
        [--out benchmarks/results/quality-synthetic]
    # the polyp inside design (issue 22): the paired comparison with 3 seeds, the other methods with one
    # (added later: seeds 1-2 of fedavgft, fedprox, apfl, fedper and centralized)
    python benchmarks/bench_quality.py --suite polyp --parts inside --methods iopfl fedbn silobn ditto fedavgft \
        fedprox apfl fedper centralized --seeds 3 --rest local fedrep --jobs 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from records import default_work, ensure_record

from iopfl.commands.adapt import adapt_cases, adapt_runtime, method_names, target_cases, test_case_ids
from iopfl.commands.runs import open_run
from iopfl.config import CONFIG_DIR, Config, build_config, read_yaml
from iopfl.data import load_dataset
from iopfl.engine.local import in_process_run
from iopfl.engine.rundir import RunDir
from iopfl.fileio import atomic_write_text
from iopfl.fl import STRATEGIES
from iopfl.report.compare import cell, compare_runs
from iopfl.report.tables import markdown_table
from iopfl.results import GLOBAL, PERSONALIZED, read_run_results

SUITES: dict[str, tuple[str, list[str], bool]] = {
    # name: (config file, overrides, has outside hold-outs)
    # the demo's six sites with 10 cases each; 16 rounds, evaluated every 4, channels-last (1.1x on an
    # AVX2 CPU): all 48 runs of --seeds 3 fit in an hour on 2 cores
    "synthetic": (
        "demo.yaml",
        ["data.synthetic.cases=10", "fl.rounds=16", "eval.eval_every=4", "runtime.channels_last=true"],
        True,
    ),
    # configs/polyp.yaml's budget, chosen for FedAvg by bench_budget.py, for every method; one process
    # per run, as --jobs runs them side by side (one thread each: the numbers of the yaml's 2 workers)
    "polyp": ("polyp.yaml", ["runtime.workers=1"], True),
    "prostate": ("prostate.yaml", [], True),
    "fundus": ("fundus.yaml", [], True),
}


def suite_config(suite: str, overrides: list[str]) -> Config:
    name, base, _ = SUITES[suite]
    return build_config(read_yaml(CONFIG_DIR / name), [*base, *overrides], origin=name)


def finish_run(cfg: Config, run_dir: Path) -> None:
    """Train ``run_dir`` to the end, resuming from its checkpoint if an earlier call was interrupted."""
    in_process_run(cfg, run_dir).run(resume=RunDir(run_dir).checkpoint.exists())


def inside_job(suite: str, method: str, seed: int, out: Path, work: Path, extra: list[str]) -> Path:
    """One inside run: its record under ``out`` (skipped if there), weights under ``work`` (resumed if
    interrupted)."""
    name = f"{method}-s{seed}"
    record, run_dir = out / "inside" / name, work / "inside" / name
    cfg = suite_config(suite, [f"fl.method={method}", f"seed={seed}", *extra])
    t0 = time.perf_counter()
    done = ensure_record(cfg, run_dir, record)
    if done != "recorded":
        print(f"inside {name}: {done} in {time.perf_counter() - t0:.0f} s", flush=True)
    return record


def outside_config(suite: str, target: str, seed: int, extra: list[str]) -> Config:
    return suite_config(
        suite, ["fl.method=iopfl", f"seed={seed}", f"data.holdout={target}", f"adapt.seed={seed}", *extra]
    )


def outside_job(
    suite: str, target: str, seed: int, out: Path, work: Path, extra: list[str], train_only: bool = False
) -> Path:
    """IOP-FL trained without ``target`` (record under ``out``, weights under ``work``), then every
    adaptation method on it → the record's ``outside.json``."""
    name = f"without-{target}-s{seed}"
    record, run_dir = out / "outside" / name, work / "outside" / name
    result_file = record / "outside.json"
    cfg = outside_config(suite, target, seed, extra)
    t0 = time.perf_counter()
    done = ensure_record(cfg, run_dir, record, need_weights=not train_only and not result_file.exists())
    if done != "recorded":
        print(f"outside {name}: {done} in {time.perf_counter() - t0:.0f} s", flush=True)
    if not train_only and not result_file.exists():
        run = open_run(run_dir)
        adapted = adapt_cases(
            run,
            target_cases(run, target),
            method_names("all"),
            None,
            cfg,
            adapt_runtime(cfg),
            scored=test_case_ids(cfg, target),
        )  # the oracle's cases too
        models = adapted.models
        for method, summary in adapted.safeguard.items():
            models[method]["safeguard"] = summary
        result_file.write_text(json.dumps(models, indent=1))
        print(f"outside {name}: adapted in {time.perf_counter() - t0:.0f} s", flush=True)
    return result_file


def run_all(job, args: list[tuple], jobs: int) -> list[Path]:
    """``job(*a)`` for every ``a``, in ``jobs`` spawned worker processes sharing the cores between them.

    A run that fails is reported as it fails, with its traceback, and the others go on (hours of
    runs should not wait behind one mistake); the failures end the call, naming the runs."""
    results: dict[int, Path] = {}
    failed: list[tuple] = []

    def settle(i: int, get) -> None:
        try:
            results[i] = get()
        except Exception as exc:  # noqa: BLE001 -- any run's failure is reported, and the others go on
            print(f"FAILED {args[i][:3]}:", file=sys.stderr, flush=True)
            traceback.print_exception(exc)
            failed.append(args[i][:3])

    if jobs == 1:
        for i, a in enumerate(args):
            settle(i, lambda a=a: job(*a))
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(
            jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=torch.set_num_threads,
            initargs=(threads,),
        ) as pool:
            futures = {pool.submit(job, *a): i for i, a in enumerate(args)}
            for future in as_completed(futures):
                settle(futures[future], future.result)
    if failed:
        raise SystemExit(f"{len(failed)} of {len(args)} runs failed: {', '.join(map(str, failed))}")
    return [results[i] for i in range(len(args))]


def inside_design(methods: list[str], seeds: int, rest: list[str], rest_seeds: int) -> list[tuple[str, int]]:
    """(method, seed) pairs in the order they run: ``methods`` seed-major (every method's seed 0 first),
    then ``rest`` with ``rest_seeds`` seeds each."""
    return [(m, s) for s in range(seeds) for m in methods] + [(m, s) for s in range(rest_seeds) for m in rest]


def run_inside(
    suite: str, design: list[tuple[str, int]], out: Path, work: Path, extra: list[str], jobs: int = 1
) -> list[Path]:
    """Every (method, seed) of ``design``; the tables from every record under ``out/inside`` (also when
    some runs failed)."""
    try:
        run_all(inside_job, [(suite, m, s, out, work, extra) for m, s in design], jobs)
    finally:
        records = write_inside_tables(out)
    return records


def write_inside_tables(out: Path) -> list[Path]:
    """``inside.md/.csv/.png`` and ``inside-paired.md/.json`` from the records alone."""
    records = sorted(p.parent for p in (out / "inside").glob("*/results.json"))
    if records:
        compare_runs(records, out / "inside.md")
        write_paired({ref: paired_differences(records, ref) for ref in REFERENCES}, out / "inside-paired")
    return records


#: What every run is paired with, on the same seed: FedAvg's global model (IOP-FL's global model is
#: trained by FedAvg), and IOP-FL's personalized models (against the other personalized models only).
REFERENCES = (("iopfl", GLOBAL), ("iopfl", PERSONALIZED))


def paired_differences(records: list[Path], reference: tuple[str, str]) -> dict:
    """(method, model) → {"seeds": [...], "mean": [diff per seed], site: [diff per seed]}: each run's
    Dice minus the ``reference`` (method, model) of the same seed, so that what the seed changes (split
    of the data stays, initialisation and order change) cancels. Paired with a personalized reference,
    only personalized models are."""
    runs = {(r.method, r.seed): r for r in (read_run_results(RunDir(p).results) for p in records)}
    ref_method, ref_model = reference
    pairs: dict = {}
    for (method, seed), results in sorted(runs.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        other_run = runs.get((ref_method, seed))
        if other_run is None:
            continue
        ref = other_run.models[ref_model]
        for model, entry in results.models.items():
            if (method, model) == reference or (ref_model == PERSONALIZED and model != PERSONALIZED):
                continue
            row = pairs.setdefault(f"{method}/{model}", {"seeds": []})
            row["seeds"].append(seed)
            for site, scores in [("mean", entry.mean), *entry.sites.items()]:
                other = ref.mean if site == "mean" else ref.sites[site]
                row.setdefault(site, []).append(100 * (scores.dice - other.dice))
    return pairs


def verdict(diffs: list[float]) -> str:
    """Declared before the runs: a difference counts only when every seed (at least 3) agrees on its sign."""
    if all(d == 0 for d in diffs):
        return "identical in every seed"
    if len(diffs) < 3:
        return f"{len(diffs)} seed{'s' if len(diffs) > 1 else ''}: no claim"
    if all(d > 0 for d in diffs):
        return "**better in every seed**"
    if all(d < 0 for d in diffs):
        return "**worse in every seed**"
    return "tie (signs differ across seeds)"


def paired_table(pairs: dict) -> str:
    """The markdown table of one reference's pairs: per seed, mean, per site, verdict."""
    sites = sorted({k for row in pairs.values() for k in row if k not in ("seeds", "mean")})
    rows = [
        [
            name,
            ", ".join(f"{d:+.2f}" for d in row["mean"]),
            f"{np.mean(row['mean']):+.2f}",
            *[f"{np.mean(row[s]):+.2f}" for s in sites],
            verdict(row["mean"]),
        ]
        for name, row in pairs.items()
    ]
    return markdown_table(["method/model", "per seed", "mean", *sites, "verdict"], rows)


def write_paired(by_reference: dict[tuple[str, str], dict], path: Path) -> None:
    """``path.md`` and ``path.json``: the paired differences to each reference, per seed and per site."""
    sections = "".join(
        f"\n## Minus `{method}/{model}` of the same seed\n\n" + paired_table(pairs)
        for (method, model), pairs in by_reference.items()
    )
    atomic_write_text(
        path.with_suffix(".md"),
        "# Inside: paired differences (Dice points, test split)\n\n"
        "Each run minus a reference model of the same seed: FedAvg's global model (IOP-FL's global model "
        "is FedAvg's), then IOP-FL's personalized models. Per-seed values are the mean over sites; site "
        "columns are means over seeds; a verdict needs every one of at least three seeds to agree.\n" + sections,
    )
    by_name = {f"{method}/{model}": pairs for (method, model), pairs in by_reference.items()}
    atomic_write_text(path.with_suffix(".json"), json.dumps(by_name, indent=1))


def run_outside(
    suite: str, seeds: list[int], out: Path, work: Path, extra: list[str], jobs: int = 1, train_only: bool = False
) -> dict:
    sites = list(load_dataset(suite_config(suite, extra).data).sites)
    pairs = [(t, s) for s in seeds for t in sites]  # seed-major: every hold-out of seed 0 finishes first
    files = run_all(outside_job, [(suite, t, s, out, work, extra, train_only) for t, s in pairs], jobs)
    if train_only:
        return {}
    scores: dict[str, dict[str, list[float]]] = {}
    for (target, _), result_file in zip(pairs, files, strict=True):
        for method, entry in json.loads(result_file.read_text()).items():
            scores.setdefault(method, {}).setdefault(target, []).append(entry["mean"]["dice"])
    oracle = oracle_scores(out, sites, seeds)
    if oracle:
        scores[ORACLE] = oracle
    write_outside_table(scores, sites, out / "outside.md")
    (out / "outside.json").write_text(json.dumps(scores, indent=1))
    return scores


def oracle_scores(out: Path, sites: list[str], seeds: list[int]) -> dict[str, list[float]]:
    """The upper bound: each site's own model trained on its labels — the inside ``local`` runs."""
    files = [RunDir(out / "inside" / f"local-s{seed}").results for seed in seeds]
    runs = [read_run_results(f) for f in files if f.exists()]
    return {s: [r.models[PERSONALIZED].sites[s].dice for r in runs] for s in sites} if runs else {}


ORACLE = "oracle (own labels)"
ORACLE_NOTE = (
    f"\n`{ORACLE}`: the site's own model trained on its labelled train split (the inside `local` "
    "run). Every row is scored on the held-out site's test split; the test-time methods adapt "
    "online over all of its images, unlabelled.\n"
)


def write_outside_table(scores: dict, sites: list[str], path: Path) -> None:
    rows = []
    for method, by_site in scores.items():
        means = [np.mean(by_site[s]) for s in sites]
        rows.append([method, *[cell(by_site[s], 100) for s in sites], f"{100 * np.mean(means):.2f}"])
    path.write_text(
        "# Outside: Dice % on each held-out site (experts trained on the others)\n\n"
        + markdown_table(["method", *sites, "mean"], rows)
        + ORACLE_NOTE
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=list(SUITES), required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--outside-seeds", type=int, help="seeds for the outside part (default: --seeds)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("-o", "--override", action="append", default=[], help="config key=value for every run")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each with cores/jobs torch threads (2 × 1 thread: ~1.6× the "
        "throughput of 1 × 2 threads for these small models)",
    )
    parser.add_argument("--parts", nargs="+", choices=["inside", "outside"], default=["inside", "outside"])
    parser.add_argument(
        "--methods", nargs="+", choices=list(STRATEGIES), help="inside methods that get --seeds seeds (default: all)"
    )
    parser.add_argument(
        "--rest",
        nargs="+",
        choices=list(STRATEGIES),
        default=[],
        help="inside methods run after --methods, with --rest-seeds seeds",
    )
    parser.add_argument("--rest-seeds", type=int, default=1)
    parser.add_argument(
        "--tables-only", action="store_true", help="run nothing: rewrite the inside tables from the records under --out"
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="run folders with their weights, outside the repository "
        "(default: $IOPFL_BENCH_WORK/<out's name> or ~/.cache/iopfl/bench/<out's name>)",
    )
    parser.add_argument(
        "--train-only", action="store_true", help="outside part: train and record the hold-out runs, adapt nothing"
    )
    args = parser.parse_args()
    out = args.out or Path(__file__).resolve().parent / "results" / f"quality-{args.suite}"
    work = args.work or default_work(out)
    t0 = time.perf_counter()
    if "inside" in args.parts:
        design = (
            []
            if args.tables_only
            else inside_design(args.methods or list(STRATEGIES), args.seeds, args.rest, args.rest_seeds)
        )
        if run_inside(args.suite, design, out, work, args.override, args.jobs):
            print((out / "inside-paired.md").read_text())
    if "outside" in args.parts and SUITES[args.suite][2]:
        run_outside(
            args.suite,
            list(range(args.outside_seeds or args.seeds)),
            out,
            work,
            args.override,
            args.jobs,
            args.train_only,
        )
        if not args.train_only:
            print((out / "outside.md").read_text())
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
