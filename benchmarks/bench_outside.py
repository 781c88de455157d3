"""Outside personalization settings study, with the choice rule fixed before any result was seen.

Every setting below re-adapts the hold-out runs of ``bench_quality.py`` (``without-<site>-s<seed>``: IOP-FL
trained without that site, its record under ``OUT/outside/``, its weights under the work folder; a run
whose weights are missing is retrained first). Adaptation runs online over all of the held-out site's
images, unlabelled. Each setting is scored twice: on the held-out site's **development cases** (its
train and val splits), where the setting is chosen, and on its **test split**, where it is reported —
so no reported figure chose anything.

The rule (written in this docstring before the first result, docs/METHOD.md "Outside safety"):
  among the IOP-FL settings that run with the safeguard, the default is the one with the best mean
  development Dice over every hold-out and seed of the suites studied, subject to never more than
  1 Dice point below BN-adapt on the development cases of any hold-out and seed. If none qualifies,
  ``iopfl adapt``'s default method becomes ``bn`` and routing keeps the setting with the smallest
  worst-case shortfall.

Results are kept per hold-out run in its record (``OUT/outside/without-…/study.json``, one entry per
setting with its overrides): a rerun adapts only the settings not recorded (or recorded with other
overrides), and the tables are built from the records alone. The trace of every adaptive setting of
seed 0 (loss terms, gates per layer, foreground fraction and the safeguard's signals per batch) is
kept beside it as ``trace-<setting>.jsonl``.

    python benchmarks/bench_outside.py --suite polyp [--seeds 3] [--jobs 2]
    python benchmarks/bench_outside.py --suite synthetic --seeds 3 --jobs 2
    python benchmarks/bench_outside.py --suite polyp --suite synthetic --tables-only   # the choice across both
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
from bench_quality import SUITES, outside_config, run_all, suite_config
from records import default_work, ensure_record, has_weights

from iopfl.commands.adapt import adapt_cases, adapt_runtime, target_cases, test_case_ids
from iopfl.commands.runs import open_run
from iopfl.data import load_dataset
from iopfl.report.compare import cell
from iopfl.report.tables import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
BEFORE = ["adapt.gate_norm=sigmoid", "adapt.gate_init=paper", "adapt.lambda_anchor=0", "adapt.safeguard=false"]
# name: (method, adapt overrides on top of the current defaults); the list was fixed before the first
# result, apart from the changes noted below it.
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "global (no adaptation)": ("global", []),
    "bn": ("bn", []),
    "iopfl simplex gates, λ_A=100 + safeguard": ("iopfl", ["adapt.lambda_anchor=100"]),
    "iopfl simplex gates, λ_A=10 + safeguard": ("iopfl", ["adapt.lambda_anchor=10"]),
    "iopfl before: sigmoid gates, no trust region, no safeguard": ("iopfl", BEFORE),
    "tent": ("tent", []),
    "ensemble": ("ensemble", []),
    "iopfl simplex gates, λ_A=1 + safeguard": ("iopfl", ["adapt.lambda_anchor=1"]),
    "iopfl sigmoid gates, no trust region + safeguard": ("iopfl", BEFORE[:-1]),
    "iopfl simplex gates, no trust region + safeguard": ("iopfl", ["adapt.lambda_anchor=0"]),
    "iopfl simplex gates, no trust region, no safeguard": ("iopfl", ["adapt.lambda_anchor=0", "adapt.safeguard=false"]),
    "tent, no safeguard": ("tent", ["adapt.safeguard=false"]),
}
# The λ_A=100 row was added after the synthetic seed-0 development rows (no candidate was within 1 point
# of BN-adapt everywhere); rows run in this order (the candidates of the rule first, where time is short).
# Cut before any IOP-FL candidate's result was seen, when one adaptation of the 1000 Kvasir-SEG frames
# took 6-8 min on a shared core: the uniform and global starts (on the synthetic sites the global start
# tracked TENT and the uniform one lost 2-3 points to the paper's start).
REFERENCE = "bn"
RUN_NAME = re.compile(r"^without-(.+)-s(\d+)$")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def study_one(suite: str, target: str, seed: int, out: Path, work: Path, available: bool = False) -> Path:
    """Every setting not yet recorded, on one hold-out run → its record's ``study.json``
    (``available``: only when the run's weights exist, never training it)."""
    name = f"without-{target}-s{seed}"
    record, run_dir = out / "outside" / name, work / "outside" / name
    study_file = record / "study.json"
    done = json.loads(study_file.read_text()) if study_file.exists() else {}
    todo = {k: v for k, v in SETTINGS.items() if done.get(k, {}).get("overrides") != v[1]}
    if not todo or (available and not has_weights(run_dir)):
        return study_file
    ensure_record(outside_config(suite, target, seed, []), run_dir, record, need_weights=True)
    run = open_run(run_dir)
    cases = target_cases(run, target)
    test = test_case_ids(run.cfg, target)
    dev = {c.case_id for c in cases} - test
    for setting, (method, overrides) in todo.items():
        cfg = outside_config(suite, target, seed, overrides)
        t0 = time.perf_counter()
        adapted = adapt_cases(run, cases, [method], None, cfg, adapt_runtime(cfg), scored=test, subsets={"dev": dev})
        entry, safeguard, traces = adapted.models[method], adapted.safeguard, adapted.traces
        done[setting] = {
            "method": method,
            "overrides": overrides,
            "test": entry["mean"]["dice"],
            "dev": entry["subsets"]["dev"]["dice"],
            "seconds": round(time.perf_counter() - t0, 1),
            "safeguard": safeguard.get(method),
        }
        if seed == 0 and method in traces:
            (record / f"trace-{slug(setting)}.jsonl").write_text(
                "".join(json.dumps(line) + "\n" for line in traces[method])
            )
        study_file.write_text(json.dumps(done, indent=1) + "\n")  # after every setting: resumable
        print(
            f"{name} {setting}: test {100 * done[setting]['test']:.2f}, dev {100 * done[setting]['dev']:.2f} "
            f"({done[setting]['seconds']:.0f} s)",
            flush=True,
        )
    return study_file


def collect(out: Path, seeds: int) -> dict[str, dict]:
    """``{run name: study.json}`` of every recorded hold-out run with seed < ``seeds``."""
    found = {}
    for folder in sorted((out / "outside").glob("without-*")):
        m = RUN_NAME.match(folder.name)
        if m and int(m[2]) < seeds and (folder / "study.json").exists():
            found[folder.name] = json.loads((folder / "study.json").read_text())
    return found


def by_target(runs: dict[str, dict], setting: str, split: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for name, study in runs.items():
        if setting in study:
            out.setdefault(RUN_NAME.match(name)[1], []).append(study[setting][split])
    return out


def shortfalls(runs: dict[str, dict], setting: str, split: str = "dev") -> list[float]:
    """Per hold-out run, BN-adapt's Dice minus the setting's (positive: the setting is worse)."""
    return [s[REFERENCE][split] - s[setting][split] for s in runs.values() if setting in s and REFERENCE in s]


def choose(runs: dict[str, dict]) -> tuple[str | None, str]:
    """The rule of the module docstring on the development cases: (chosen setting or None, why)."""
    candidates = [
        n
        for n, (m, o) in SETTINGS.items()
        if m == "iopfl" and "adapt.safeguard=false" not in o and all(n in s for s in runs.values())
    ]  # judged only where every hold-out has it
    mean = {n: float(np.mean([s[n]["dev"] for s in runs.values()])) for n in candidates}
    worst = {n: max(shortfalls(runs, n)) for n in candidates}
    safe = [n for n in candidates if worst[n] <= 0.01]
    if safe:
        best = max(safe, key=mean.get)
        return best, (
            f"best mean development Dice ({100 * mean[best]:.2f}) among the settings never more than "
            f"1 point below BN-adapt (worst: {100 * worst[best]:+.2f} below)"
        )
    least = min(candidates, key=worst.get)
    return None, (
        f"no setting stays within 1 point of BN-adapt on every hold-out and seed; the smallest "
        f"worst-case shortfall is {100 * worst[least]:.2f} points ({least}): the default method "
        f"becomes bn"
    )


def table(runs: dict[str, dict], split: str) -> str:
    targets = sorted({RUN_NAME.match(n)[1] for n in runs})
    rows = []
    for setting in SETTINGS:
        scores = by_target(runs, setting, split)
        if not scores:
            continue
        falls = shortfalls(runs, setting, split)
        fb = [
            s[setting]["safeguard"]["fallbacks"] / s[setting]["safeguard"]["batches"]
            for s in runs.values()
            if setting in s and s[setting].get("safeguard")
        ]
        means = [np.mean(scores[t]) for t in targets if t in scores]
        rows.append(
            [
                setting,
                *[cell(scores.get(t, []), 100) for t in targets],
                f"{100 * np.mean(means):.2f}",
                f"{100 * max(falls):+.2f}" if falls else "—",
                f"{100 * np.mean(fb):.1f}" if fb else "—",
            ]
        )
    return markdown_table(["setting", *targets, "mean", "worst vs bn (points below)", "fell back % of batches"], rows)


def write_tables(out: Path, runs: dict[str, dict], suites: list[str]) -> str:
    chosen, why = choose(runs)
    seeds = sorted({int(RUN_NAME.match(n)[2]) for n in runs})
    text = (
        f"# Outside settings study: {', '.join(suites)}, {len(runs)} hold-out runs (seeds {seeds})\n\n"
        "Dice % of each held-out site (mean ± std over seeds). Chosen on the development cases (train + "
        "val splits of the held-out site), reported on its test split; adaptation sees all images.\n\n"
        "## Development cases (the choice)\n\n"
        + table(runs, "dev")
        + f"\nChosen by the rule fixed in advance (benchmarks/bench_outside.py): **{chosen or 'bn'}** — {why}.\n\n"
        "## Test split (reported)\n\n" + table(runs, "test")
    )
    (out / "outside-study.md").write_text(text)
    (out / "outside-study.json").write_text(json.dumps({"chosen": chosen, "why": why, "runs": runs}, indent=1) + "\n")
    return text


DEFAULT_SETTING = "iopfl simplex gates, λ_A=100 + safeguard"
BEFORE_SETTING = "iopfl before: sigmoid gates, no trust region, no safeguard"


def read_trace(record: Path, setting: str) -> list[dict]:
    path = record / f"trace-{slug(setting)}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_traces(out: Path) -> Path | None:
    """``out/outside-trace.png``: per seed-0 hold-out, the predicted foreground fraction per batch of the
    old default, the new default and BN-adapt (top), and the old default's gate sum per routed layer
    (bottom) — how the collapse happens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in sorted((out / "outside").glob("without-*-s0")) if read_trace(r, BEFORE_SETTING)]
    if not records:
        return None
    fig, axes = plt.subplots(2, len(records), figsize=(4.2 * len(records), 6), squeeze=False)
    for col, record in enumerate(records):
        before, default = read_trace(record, BEFORE_SETTING), read_trace(record, DEFAULT_SETTING)
        top, bottom = axes[0][col], axes[1][col]
        top.plot([t["reference_foreground"] for t in before], color="grey", label="BN-adapt")
        top.plot([t["foreground"] for t in before], color="tab:red", label="before (sigmoid, no safeguard)")
        if default:
            top.plot([t["foreground"] for t in default], color="tab:blue", label="default (simplex, λ_A=1, safeguard)")
        top.set_title(RUN_NAME.match(record.name)[1], fontsize=9)
        top.set_ylabel("predicted foreground fraction")
        sums = np.array([t["gate_sum"] for t in before])
        bottom.plot(sums, linewidth=0.8)
        bottom.set_ylabel("gate sum per routed layer (before)")
        bottom.set_xlabel("batch")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "outside-trace.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", choices=[s for s, v in SUITES.items() if v[2]], required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="hold-out runs adapted at a time")
    parser.add_argument("--out", type=Path, help="where the combined table goes (default: the first suite's folder)")
    parser.add_argument(
        "--available",
        action="store_true",
        help="study only hold-out runs whose weights exist (while bench_quality.py trains the rest)",
    )
    parser.add_argument("--target", action="append", help="only these held-out sites (default: all)")
    parser.add_argument("--tables-only", action="store_true", help="build the tables from the records only")
    args = parser.parse_args()
    runs: dict[str, dict] = {}
    for suite in args.suite:
        out = RESULTS / f"quality-{suite}"
        if not args.tables_only:
            sites = list(load_dataset(suite_config(suite, []).data).sites)
            jobs = [
                (suite, t, s, out, default_work(out), args.available)
                for s in range(args.seeds)
                for t in sites
                if not args.target or t in args.target
            ]
            run_all(study_one, jobs, args.jobs)
        runs.update(collect(out, args.seeds))  # run names carry their site, which no two suites share
        plot_traces(out)
    print(write_tables(args.out or RESULTS / f"quality-{args.suite[0]}", runs, args.suite))


if __name__ == "__main__":
    main()
