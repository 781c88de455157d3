"""One federated round (every site trains, then every site is evaluated) with the sites in one
process against ``runtime.workers=2`` worker processes, and with ``runtime.compile`` off and on.

Each variant runs ``--rounds`` rounds of the same config from scratch (evaluation every round) and the
time of each round after the first is taken from the progress hooks, so worker start-up, data loading
and compilation are excluded (they are paid once per run, and printed apart). One process uses every
core; two workers one thread each.

Writes ``benchmarks/results/bench_round.json`` and ``.md``.

    python benchmarks/bench_round.py [--configs demo polyp] [--rounds 3] [--variants ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from iopfl.config import CONFIG_DIR, build_config, read_yaml
from iopfl.engine.local import in_process_run

OUT = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONFIGS = {"demo": ("demo.yaml", []), "polyp": ("polyp.yaml", [f"data.root={SHARED}"])}
VARIANTS = {  # name: overrides
    "1 process": ["runtime.workers=1"],
    "2 workers": ["runtime.workers=2"],
    "1 process, compile": ["runtime.workers=1", "runtime.compile=true"],
    "2 workers, compile": ["runtime.workers=2", "runtime.compile=true"],
}


class RoundClock:
    """Progress hook: the wall time of each round (start of training to end of its evaluation)."""

    def __init__(self):
        self.started = 0.0
        self.mark = 0.0
        self.rounds: list[float] = []

    def start(self, total_rounds: int, first_round: int, trainers_per_round: int) -> None:
        self.started = self.mark = time.perf_counter()

    def client_done(self, round_: int, site: str, loss: float) -> None: ...

    def round_done(self, round_: int, val_dice: dict[str, float]) -> None:
        now = time.perf_counter()
        self.rounds.append(now - self.mark)
        self.mark = now


def time_variant(config: str, overrides: list[str], rounds: int) -> dict:
    name, base = CONFIGS[config]
    cfg = build_config(
        read_yaml(CONFIG_DIR / name),
        [*base, *overrides, f"fl.rounds={rounds}", "eval.eval_every=1", "eval.overlays=0"],
        origin=name,
    )
    clock = RoundClock()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        in_process_run(cfg, Path(tmp) / "run", clock).run()
        total = time.perf_counter() - t0
    steady = clock.rounds[1:]
    return {
        "round_s": sum(steady) / len(steady),
        "first_round_s": clock.rounds[0],
        "setup_s": clock.started - t0 if clock.started else None,
        "total_s": total,
    }


def to_markdown(rows: list[dict]) -> str:
    lines = ["| config | variant | s / round | × 1 process | first round (s) |", "|---|---|---:|---:|---:|"]
    for row in rows:
        for variant, r in row["variants"].items():
            lines.append(
                f"| {row['config']} | {variant} | {r['round_s']:.1f} | "
                f"{row['variants']['1 process']['round_s'] / r['round_s']:.2f} | {r['first_round_s']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=OUT, help="folder for bench_round.json and .md")
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        if config == "polyp" and not SHARED.is_dir():
            print(f"skipping polyp: {SHARED} not found")
            continue
        variants = {}
        for variant in args.variants:
            variants[variant] = time_variant(config, VARIANTS[variant], args.rounds)
            print(f"{config} {variant}: {variants[variant]['round_s']:.1f} s / round", flush=True)
        rows.append(
            {
                "config": config,
                "cores": os.cpu_count(),
                "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "variants": variants,
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_round.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = to_markdown(rows)
    (args.out / "bench_round.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
