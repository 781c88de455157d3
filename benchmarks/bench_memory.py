"""Long-run memory: 50 rounds of the demo's IOP-FL run, resident memory after every round.

Peak RSS must stay flat: nothing (autograd graphs, metrics, personal states, selected models) may
accumulate from round to round. Writes ``benchmarks/results/bench_memory.json`` and ``.md``; exits 1
when the peak at the last round exceeds the peak at round 5 by more than 5 %.

    python benchmarks/bench_memory.py [--rounds 50]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import psutil

from iopfl.config import CONFIG_DIR, build_config, read_yaml
from iopfl.engine.local import in_process_run

OUT = Path(__file__).resolve().parent / "results"


class MemoryProbe:
    """A runner progress hook recording RSS and peak RSS (MB) once per round, after its training."""

    def __init__(self):
        self.rows: list[dict] = []
        self.process = psutil.Process()
        self.per_round, self.done = 0, 0

    def start(self, total_rounds: int, first_round: int, trainers_per_round: int) -> None:
        self.per_round = trainers_per_round

    def client_done(self, round_: int, site: str, loss: float) -> None:
        self.done += 1
        if self.done % self.per_round == 0:  # the round's last client has trained
            self.rows.append(
                {
                    "round": round_,
                    "rss_mb": self.process.memory_info().rss / 2**20,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
            )

    def round_done(self, round_: int, val_dice: dict[str, float]) -> None: ...


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    cfg = build_config(read_yaml(CONFIG_DIR / "demo.yaml"), [f"fl.rounds={args.rounds}", "eval.eval_every=1"])
    with tempfile.TemporaryDirectory() as tmp:
        probe = MemoryProbe()
        in_process_run(cfg, Path(tmp) / "run", probe).run()
    by_round = {r["round"]: r for r in probe.rows}
    r5, last = by_round[5], by_round[args.rounds]
    growth = last["peak_rss_mb"] / r5["peak_rss_mb"] - 1
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_memory.json").write_text(
        json.dumps({"rounds": probe.rows, "peak_growth_5_to_last": growth}, indent=1)
    )
    table = (
        "| round | RSS (MB) | peak RSS (MB) |\n|---:|---:|---:|\n"
        + "".join(
            f"| {r['round']} | {r['rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |\n"
            for r in probe.rows
            if r["round"] in (1, 5, 10, 20, 30, 40, args.rounds)
        )
        + f"\nPeak RSS growth from round 5 to round {args.rounds}: {100 * growth:+.2f} %\n"
    )
    (OUT / "bench_memory.md").write_text(table)
    print(table)
    sys.exit(0 if growth <= 0.05 else 1)


if __name__ == "__main__":
    main()
