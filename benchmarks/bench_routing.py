"""Routed-model cost: the plain U-Net (the floor), the routed model over E experts (one grouped
convolution per layer), and a naive per-sample loop computing the same outputs; forward + backward at
batch 8 with 6 experts. Then whole-site adaptation throughput (images/s) of every outside method.

Writes ``benchmarks/results/bench_routing.json`` and ``.md``.

    python benchmarks/bench_routing.py [--repeats 5] [--sizes demo published]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from iopfl.adapt import METHODS, AdaptConfig, build_method
from iopfl.models import build_model
from iopfl.models.routing import RoutedConv2d, RoutedConvTranspose2d, route_experts

OUT = Path(__file__).resolve().parent / "results"
SIZES = {"demo": (8, 3, 64), "published": (32, 4, 384)}  # width, depth, image size
BATCH, EXPERTS = 8, 6


def _naive_conv(self: RoutedConv2d, x: torch.Tensor) -> torch.Tensor:
    """The same routed layer, one sample at a time (what the batched version replaces)."""
    gates = self.router(x)
    outs = []
    for i in range(x.shape[0]):
        w = torch.einsum("e,e...->...", gates[i], self.weight)
        b = None if self.bias is None else gates[i] @ self.bias
        if isinstance(self, RoutedConvTranspose2d):
            outs.append(
                F.conv_transpose2d(
                    x[i : i + 1], w, b, self.stride, self.padding, self.output_padding, self.groups, self.dilation
                )
            )
        else:
            outs.append(F.conv2d(x[i : i + 1], w, b, self.stride, self.padding, self.dilation, self.groups))
    return torch.cat(outs)


class NaiveRouted(nn.Module):
    """Wraps a routed model, swapping every routed layer's forward for the per-sample loop."""

    def __init__(self, routed: nn.Module):
        super().__init__()
        self.routed = routed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        originals = {}
        for m in self.routed.modules():
            if isinstance(m, (RoutedConv2d, RoutedConvTranspose2d)):
                originals[m] = m.forward
                m.forward = _naive_conv.__get__(m)
        try:
            return self.routed(x)
        finally:
            for m, fwd in originals.items():
                m.forward = fwd


def time_fwd_bwd(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward + backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = model(x)
        out.float().square().mean().backward()
        for p in params:
            p.grad = None
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_models(name: str, repeats: int) -> dict:
    width, depth, size = SIZES[name]
    torch.manual_seed(0)
    build: Callable[[], nn.Module] = lambda: build_model(3, 2, width, depth)  # noqa: E731
    states = [build().state_dict() for _ in range(EXPERTS)]
    x = torch.randn(BATCH, 3, size, size)
    plain = build()
    plain.train()
    routed = route_experts(states, build)
    routed.train()
    naive = NaiveRouted(routed)
    row = {
        "size": name,
        "width": width,
        "depth": depth,
        "image": size,
        "batch": BATCH,
        "experts": EXPERTS,
        "plain_s": time_fwd_bwd(plain, x, repeats),
        "routed_s": time_fwd_bwd(routed, x, repeats),
        "naive_s": time_fwd_bwd(naive, x, max(1, repeats // 2)),
    }
    row["routed_over_plain"] = row["routed_s"] / row["plain_s"]
    row["naive_over_routed"] = row["naive_s"] / row["routed_s"]
    return row


def bench_methods(images: int = 32) -> dict[str, float]:
    width, depth, size = SIZES["demo"]
    torch.manual_seed(0)
    build = lambda: build_model(3, 2, width, depth)  # noqa: E731
    states = [build().state_dict() for _ in range(EXPERTS)]
    batches = list(torch.randn(images, 3, size, size).split(BATCH))
    speeds = {}
    for name in METHODS:
        method = build_method(name, states, build, AdaptConfig())
        method.adapt_and_predict(batches[:1])  # warm-up: one-off kernel and buffer set-up
        t0 = time.perf_counter()
        method.adapt_and_predict(batches)
        speeds[name] = images / (time.perf_counter() - t0)
    return speeds


def to_markdown(rows: list[dict], speeds: dict[str, float]) -> str:
    lines = [
        f"Forward + backward, batch {BATCH}, {EXPERTS} experts (median seconds):",
        "",
        "| size | plain (floor) | routed | naive per-sample loop | routed / plain | naive / routed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} ({r['width']}w, depth {r['depth']}, {r['image']} px) | {r['plain_s']:.4f} | "
            f"{r['routed_s']:.4f} | {r['naive_s']:.4f} | {r['routed_over_plain']:.2f}× | "
            f"{r['naive_over_routed']:.2f}× |"
        )
    lines += [
        "",
        "Whole-site adaptation at demo size (32 images, 1 step per batch, 1 pass):",
        "",
        "| method | images/s |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in speeds.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    rows = [bench_models(name, args.repeats) for name in args.sizes]
    speeds = bench_methods()
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_routing.json").write_text(json.dumps({"models": rows, "adapt_images_per_s": speeds}, indent=2))
    table = to_markdown(rows, speeds)
    (OUT / "bench_routing.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
