"""Local-training throughput: our LocalTrainer vs a plain PyTorch loop, in one process.

Both train the same U-Net on the same samples with the same batch size for the same number of
"rounds" (one local epoch each, a fresh Adam per round, as the published recipe does). The plain loop
is what a newcomer writes: a DataLoader over a per-sample dataset, fp32, default memory format.
Ours stacks the samples once and indexes batches (no collation), uses channels-last, and optionally
bf16 autocast. Variants alternate round by round so machine noise hits both alike.

Writes ``benchmarks/results/bench_train.json`` and ``.md``.

    python benchmarks/bench_train.py [--rounds 4] [--sizes demo published]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from iopfl.fl.training import LocalTrainer, TrainSettings
from iopfl.models import build_model
from iopfl.models.losses import segmentation_loss
from iopfl.seeding import derive_generator

OUT = Path(__file__).resolve().parent / "results"
SIZES = {  # name: (width, depth, image size, batch, samples per round)
    "demo": (8, 3, 64, 8, 96),
    "published": (32, 4, 384, 5, 20),
}


class PerSample(Dataset):
    """What a plain pipeline has: one sample at a time, collated by the DataLoader."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor):
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.masks[i]


def synthetic_samples(size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blob-on-noise images with their masks (content does not affect speed)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centres = torch.rand(n, 2, generator=g) - 0.5
    masks = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2 < 0.15).long()
    images = masks[:, None].float().repeat(1, 3, 1, 1) + 0.5 * torch.randn(n, 3, size, size, generator=g)
    return images, masks


def plain_round(build: Callable[[], torch.nn.Module], weights: dict, images, masks, batch: int, seed: int) -> None:
    model = build()
    model.load_state_dict(weights)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    loader = DataLoader(PerSample(images, masks), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    for x, y in loader:
        loss = segmentation_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_size(name: str, rounds: int) -> dict:
    width, depth, size, batch, n = SIZES[name]
    images, masks = synthetic_samples(size, n)
    build = lambda: build_model(3, 2, width, depth)  # noqa: E731
    weights = build().state_dict()
    variants: dict[str, Callable[[int], None]] = {"plain": lambda r: plain_round(build, weights, images, masks, batch, r)}
    for label, settings in {
        "ours fp32": TrainSettings(batch_size=batch, precision="fp32"),
        "ours fp32 channels-last": TrainSettings(batch_size=batch, channels_last=True, precision="fp32"),
        "ours bf16": TrainSettings(batch_size=batch, precision="bf16"),
        "ours bf16 channels-last": TrainSettings(batch_size=batch, channels_last=True, precision="bf16"),
    }.items():
        trainer = LocalTrainer(build, images, masks, settings)
        variants[label] = lambda r, t=trainer: t.train(weights, derive_generator(0, r))
    times = {k: [] for k in variants}
    for fn in variants.values():
        fn(-1)  # warm-up: one-off allocations and kernel selection
    for r in range(rounds):
        for label, fn in variants.items():
            t0 = time.perf_counter()
            fn(r)
            times[label].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    return {
        "size": name, "width": width, "depth": depth, "image": size, "batch": batch, "samples": n,
        "threads": torch.get_num_threads(),
        "samples_per_s": {k: n / t for k, t in best.items()},
        "speedup_vs_plain": {k: best["plain"] / t for k, t in best.items()},
        "peak_rss_mb": peak_rss_mb(),
    }


def to_markdown(rows: list[dict]) -> str:
    lines = ["| size | variant | samples/s | × plain | peak RSS (MB) |", "|---|---|---:|---:|---:|"]
    for row in rows:
        for k, v in row["samples_per_s"].items():
            lines.append(f"| {row['size']} ({row['width']}w, {row['image']}px, b{row['batch']}) | {k} | "
                         f"{v:.1f} | {row['speedup_vs_plain'][k]:.2f} | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    rows = [bench_size(name, args.rounds) for name in args.sizes]
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_train.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = to_markdown(rows)
    (OUT / "bench_train.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
