"""Do two devices train the same? One round of a published-size run (synthetic sites at 384 px, U-Net
width 32, depth 4, fp32 with deterministic kernels) on each device from the same θ^0 and the same
batches; the first round's per-site training losses must agree within ``--rtol`` (default 1e-3:
different convolution algorithms sum in different orders, so the last bits differ from the first
step on and the difference grows over the round's steps; a wrong device path misses by far more).

Writes ``OUT/device_agreement.json`` and ``.md``.

    python benchmarks/device_agreement.py --devices cpu cuda [--out benchmarks/results/gpu]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from iopfl.config import build_config
from iopfl.engine.local import in_process_run
from iopfl.engine.rundir import RunDir
from iopfl.results import TrainLine, read_metrics
from iopfl.runtime import resolve_device

SETTING = {  # the published model and input size on a small synthetic federation (seconds per round)
    "data": {
        "source": "synthetic",
        "image_size": 384,
        "synthetic": {"sites": 2, "cases": 3, "size": 384, "slices": 4, "seed": 0},
    },
    "model": {"width": 32, "depth": 4},
    "fl": {"method": "iopfl", "rounds": 1},
    "train": {"batch_size": 5},
    "eval": {"overlays": 0},
    "runtime": {"precision": "fp32", "deterministic": True},
}


def first_round_losses(device: str, cache: Path) -> tuple[dict[str, float], float]:
    tree = json.loads(json.dumps(SETTING))
    tree["data"]["cache_dir"] = str(cache)
    tree["runtime"]["device"] = device
    cfg = build_config(tree, origin="device_agreement")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        in_process_run(cfg, Path(tmp) / "run").run()
        seconds = time.perf_counter() - t0
        lines = read_metrics(RunDir(Path(tmp) / "run").metrics)
    return {x.site: x.loss for x in lines if isinstance(x, TrainLine)}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs=2, default=["cpu", "cuda"])
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu")
    args = parser.parse_args()
    for device in args.devices:
        resolve_device(device, "--devices")
    with tempfile.TemporaryDirectory() as cache:
        runs = {d: first_round_losses(d, Path(cache)) for d in args.devices}
    (a, (la, ta)), (b, (lb, tb)) = runs.items()
    worst = max(abs(la[s] - lb[s]) / abs(la[s]) for s in la)
    result = {
        "devices": args.devices,
        "losses": {a: la, b: lb},
        "seconds": {a: ta, b: tb},
        "max_relative_difference": worst,
        "rtol": args.rtol,
        "agree": worst <= args.rtol,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "".join(f"| {s} | {la[s]:.6f} | {lb[s]:.6f} | {abs(la[s] - lb[s]) / abs(la[s]):.2e} |\n" for s in la)
    table = (
        f"| site | first-round loss on {a} | on {b} | relative difference |\n|---|---:|---:|---:|\n{rows}\n"
        f"Largest relative difference {worst:.2e} (tolerance {args.rtol:g}): "
        f"{'agree' if result['agree'] else 'DISAGREE'}. One round: {ta:.1f} s on {a}, {tb:.1f} s on {b}.\n"
    )
    (args.out / "device_agreement.md").write_text(table)
    print(table)
    raise SystemExit(0 if result["agree"] else 1)


if __name__ == "__main__":
    main()
