"""Local-training throughput: our LocalTrainer vs a plain PyTorch loop, in one process, on one device.

Both train the same U-Net on the same samples with the same batch size for the same number of
"rounds" (one local epoch each, a fresh Adam per round, as the published recipe does). The plain loop
is what a newcomer writes: a DataLoader over a per-sample dataset, fp32, default memory format, the
model on the device and each batch copied there. Ours keeps the samples stacked (on the device when
they fit) and indexes batches, uses the fused Adam, and optionally channels-last, bf16 autocast and
torch.compile. Variants alternate round by round so machine noise hits them alike.

bf16 variants run only where the device has bf16 kernels (CUDA Ampere+, AVX-512/AMX CPUs): elsewhere
autocast emulates bf16 ~9x slower than fp32, and the benchmark says it skipped them. On a CPU the
published size runs ``--cpu-published-rounds`` rounds (default 2) so the whole benchmark stays within
10 minutes on 2 cores.

Writes ``benchmarks/results/bench_train[-<device>].json`` and ``.md``.

    python benchmarks/bench_train.py [--device cpu|cuda] [--rounds 4] [--sizes demo polyp published]
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
from iopfl.runtime import Runtime, resolve_device, resolve_precision
from iopfl.seeding import derive_generator

OUT = Path(__file__).resolve().parent / "results"
SIZES = {  # name: (width, depth, image size, batch, samples per round)
    "demo": (8, 3, 64, 8, 96),
    "polyp": (16, 4, 128, 8, 64),
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


def plain_round(
    build: Callable[[], torch.nn.Module], weights: dict, images, masks, batch: int, seed: int, device: torch.device
) -> None:
    model = build().to(device)
    model.load_state_dict(weights)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    loader = DataLoader(
        PerSample(images, masks), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    for x, y in loader:
        loss = segmentation_loss(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    synchronize(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variant_settings(batch: int, device: torch.device) -> tuple[dict[str, TrainSettings], list[str]]:
    """Our variants this device runs fast, and a note for each it skips."""
    bf16 = resolve_precision("auto", device) == "bf16"
    variants, skipped = {}, []
    for label, precision, channels_last, compiled in [
        ("ours fp32", "fp32", False, False),
        ("ours fp32 channels-last", "fp32", True, False),
        ("ours fp32 channels-last compile", "fp32", True, True),
        ("ours bf16", "bf16", False, False),
        ("ours bf16 channels-last", "bf16", True, False),
        ("ours bf16 channels-last compile", "bf16", True, True),
    ]:
        if precision == "bf16" and not bf16:
            skipped.append(f"{label}: {device} has no native bf16 kernels (emulated bf16 is ~9x slower than fp32)")
            continue
        variants[label] = TrainSettings(
            batch_size=batch, precision=precision, channels_last=channels_last, device=str(device), compile=compiled
        )
    return variants, skipped


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_size(name: str, rounds: int, device: torch.device) -> dict:
    width, depth, size, batch, n = SIZES[name]
    images, masks = synthetic_samples(size, n)
    build = lambda: build_model(3, 2, width, depth)  # noqa: E731
    weights = build().state_dict()
    variants: dict[str, Callable[[int], None]] = {
        "plain": lambda r: plain_round(build, weights, images, masks, batch, r, device)
    }
    settings, skipped = variant_settings(batch, device)
    for label, s in settings.items():
        trainer = LocalTrainer(build, images, masks, s)
        variants[label] = lambda r, t=trainer: (t.train(weights, derive_generator(0, r)), synchronize(device))
    times = {k: [] for k in variants}
    warmup = {}
    for label, fn in variants.items():
        t0 = time.perf_counter()
        fn(-1)  # warm-up: one-off allocations, kernel selection, compilation
        warmup[label] = time.perf_counter() - t0
    for r in range(rounds):
        for label, fn in variants.items():
            t0 = time.perf_counter()
            fn(r)
            times[label].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    return {
        "size": name,
        "width": width,
        "depth": depth,
        "image": size,
        "batch": batch,
        "samples": n,
        "rounds": rounds,
        "device": str(device),
        "device_name": Runtime(device, "fp32").describe()["device_name"],
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "samples_per_s": {k: n / t for k, t in best.items()},
        "speedup_vs_plain": {k: best["plain"] / t for k, t in best.items()},
        "warmup_s": warmup,
        "skipped": skipped,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def to_markdown(rows: list[dict]) -> str:
    lines = ["| device | size | variant | samples/s | × plain | warm-up (s) |", "|---|---|---|---:|---:|---:|"]
    for row in rows:
        for k, v in row["samples_per_s"].items():
            lines.append(
                f"| {row['device_name']} | {row['size']} ({row['width']}w, {row['image']}px, b{row['batch']}) "
                f"| {k} | {v:.1f} | {row['speedup_vs_plain'][k]:.2f} | {row['warmup_s'][k]:.1f} |"
            )
    notes = [f"- {row['size']}: skipped {note}" for row in rows for note in row["skipped"]]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cpu-published-rounds", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    device = resolve_device(args.device, "--device")
    rows = []
    for name in args.sizes:
        rounds = args.cpu_published_rounds if device.type == "cpu" and name == "published" else args.rounds
        rows.append(bench_size(name, rounds, device))
        print(to_markdown(rows[-1:]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_train" if device.type == "cpu" else f"bench_train-{device.type}"
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = to_markdown(rows)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
