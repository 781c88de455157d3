"""Outside adaptation one slice at a time: BN-adapt, TENT and IOP-FL routing at test batch sizes 1, 2 and
8, with plain batch statistics (``adapt.min_batch_stats=1``) and with the stream fallback (the default).

Trains, where missing, one IOP-FL run per held-out site on the demo configuration with a few rounds
(``OUT/without-<site>``), then adapts to that site. Writes ``OUT/small-batch.json`` and ``.md``.

    python benchmarks/bench_small_batch.py --out runs/small-batch [--sites SiteC SiteA] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from iopfl.commands.adapt import adapt_cases, adapt_runtime, target_cases
from iopfl.commands.runs import open_run
from iopfl.config import load_config
from iopfl.engine.local import in_process_run
from iopfl.engine.rundir import RunDir
from iopfl.report.tables import markdown_table

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
METHODS = ["bn", "tent", "iopfl"]
# name: (batch size, adapt overrides)
SETTINGS: dict[str, tuple[int, list[str]]] = {
    "batch 8": (8, []),
    "batch 2, batch statistics": (2, ["adapt.min_batch_stats=1"]),
    "batch 2, stream fallback": (2, []),
    "batch 1, batch statistics": (1, ["adapt.min_batch_stats=1"]),
    "batch 1, stream fallback": (1, []),
}


def hold_out_run(out: Path, site: str, rounds: int) -> Path:
    run_dir = out / f"without-{site}"
    if not RunDir(run_dir).results.exists():
        cfg = load_config(
            DEMO,
            [
                f"data.holdout={site}",
                f"fl.rounds={rounds}",
                f"eval.eval_every={rounds // 2}",
                "train.precision=fp32",
                "train.threads=1",
            ],
        )
        in_process_run(cfg, run_dir).run()
    return run_dir


def measure(out: Path, sites: list[str], rounds: int) -> dict:
    """``{site: {setting: {method: Dice}}}`` plus the global model's Dice per site."""
    result: dict = {}
    for site in sites:
        run_dir = hold_out_run(out, site, rounds)
        run, row = open_run(run_dir), {}
        cases = target_cases(run, site)
        run_cfg = load_config(run_dir / "config.yaml")
        models = adapt_cases(run, cases, ["global"], None, run_cfg, adapt_runtime(run_cfg)).models
        row["global"] = models["global"]["mean"]["dice"]
        for name, (batch, overrides) in SETTINGS.items():
            cfg = load_config(run_dir / "config.yaml", [f"adapt.batch_size={batch}", *overrides])
            t0 = time.perf_counter()
            models = adapt_cases(run, cases, METHODS, None, cfg, adapt_runtime(cfg)).models
            row[name] = {m: models[m]["mean"]["dice"] for m in METHODS}
            print(
                f"{site} {name}: "
                + ", ".join(f"{m} {100 * d:.2f}" for m, d in row[name].items())
                + f" ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        result[site] = row
    return result


def write_tables(result: dict, out: Path) -> None:
    sites = list(result)
    header = ["setting", *[f"{site} {m}" for site in sites for m in METHODS]]
    rows = [[name, *[f"{100 * result[s][name][m]:.2f}" for s in sites for m in METHODS]] for name in SETTINGS]
    glob = ", ".join(f"{s} {100 * result[s]['global']:.2f}" for s in sites)
    (out / "small-batch.json").write_text(json.dumps(result, indent=1))
    (out / "small-batch.md").write_text(
        "# Outside adaptation by test batch size: Dice % on the held-out site\n\n"
        f"Global model (no adaptation): {glob}.\n\n" + markdown_table(header, rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sites", nargs="+", default=["SiteC", "SiteA"])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    result = measure(args.out, args.sites, args.rounds)
    write_tables(result, args.out)
    print((args.out / "small-batch.md").read_text())


if __name__ == "__main__":
    main()
