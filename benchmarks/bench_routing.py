"""Routed-model cost and outside-adaptation throughput.

1. Forward + backward at batch 8 with 6 experts, demo size (width 8, depth 3, 3×64²) and published size
   (width 32, depth 4, 3×384²), of (a) the plain U-Net (the floor), (b) the routed model (one grouped
   convolution per layer), (c) a naive per-sample loop computing the same routed outputs. The three are
   timed round-robin (a, b, c, a, b, c, …) so that load from other processes hits all of them alike;
   median and minimum are reported.
2. Whole-site adaptation throughput (images/s) of every outside method on 32 random images at demo size
   (default ``AdaptConfig``: batches of 8, 1 step per batch, 1 pass).

Targets: routed within 1.3× of plain at demo size; routed faster than the naive loop at every size.
Writes ``benchmarks/results/bench_routing.json`` and ``.md`` and prints the table.

    python benchmarks/bench_routing.py [--repeats 7] [--published-repeats 2] [--sizes demo published]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from iopfl.adapt import METHODS, AdaptConfig, build_method
from iopfl.models import build_model
from iopfl.models.routing import ROUTED_TYPES, RoutedConv2d, RoutedConvTranspose2d, route_experts

OUT = Path(__file__).resolve().parent / "results"
SIZES = {"demo": (8, 3, 64), "published": (32, 4, 384)}  # width, depth, image size
BATCH, EXPERTS, SITE_IMAGES = 8, 6, 32
DEMO_TARGET = 1.3


def _naive_forward(self: RoutedConv2d | RoutedConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """The same routed layer, one sample at a time (what the batched version replaces)."""
    gates = self.router(x)
    outs = []
    for i in range(x.shape[0]):
        w = torch.einsum("e,e...->...", gates[i], self.weight)
        b = None if self.bias is None else gates[i] @ self.bias
        xi = x[i : i + 1]
        if isinstance(self, RoutedConvTranspose2d):
            outs.append(F.conv_transpose2d(xi, w, b, self.stride, self.padding, self.output_padding,
                                           self.groups, self.dilation))
        else:
            outs.append(F.conv2d(xi, w, b, self.stride, self.padding, self.dilation, self.groups))
    return torch.cat(outs)


class NaiveRouted(nn.Module):
    """Runs a routed model with every routed layer's forward swapped for the per-sample loop."""

    def __init__(self, routed: nn.Module):
        super().__init__()
        self.routed = routed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = [m for m in self.routed.modules() if isinstance(m, ROUTED_TYPES)]
        for m in layers:
            m.forward = _naive_forward.__get__(m)  # instance attribute shadows the class method
        try:
            return self.routed(x)
        finally:
            for m in layers:
                del m.forward


def _fwd_bwd(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward + backward (gradients dropped afterwards)."""
    t0 = time.perf_counter()
    model(x).square().mean().backward()
    elapsed = time.perf_counter() - t0
    for p in model.parameters():
        p.grad = None
    return elapsed


def time_round_robin(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Per model, ``repeats`` timings after one warm-up, interleaved model by model."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(repeats + 1):
        for name, model in models.items():
            t = _fwd_bwd(model, x)
            if i:  # the first round is a warm-up (allocator, oneDNN primitive caches)
                times[name].append(t)
    return times


def bench_models(name: str, repeats: int) -> dict:
    width, depth, size = SIZES[name]
    torch.manual_seed(0)
    build: Callable[[], nn.Module] = lambda: build_model(3, 2, width, depth)
    states = [build().state_dict() for _ in range(EXPERTS)]
    x = torch.randn(BATCH, 3, size, size)
    plain, routed = build(), route_experts(states, build)
    naive = NaiveRouted(routed)
    with torch.no_grad():  # sanity: the loop computes the same thing (dropout off for both)
        routed.eval()
        err = (routed(x) - naive(x)).abs().max().item()
    plain.train()
    routed.train()
    times = time_round_robin({"plain": plain, "routed": routed, "naive": naive}, x, repeats)
    row = {"size": name, "width": width, "depth": depth, "image": size, "batch": BATCH, "experts": EXPERTS,
           "repeats": repeats, "max_abs_diff_naive": err}
    for k, ts in times.items():
        row[f"{k}_s"] = statistics.median(ts)
        row[f"{k}_min_s"] = min(ts)
    row["routed_over_plain"] = row["routed_s"] / row["plain_s"]
    row["naive_over_routed"] = row["naive_s"] / row["routed_s"]
    return row


def bench_methods(images: int = SITE_IMAGES) -> dict[str, float]:
    """Images per second of each method over one site of ``images`` random demo-size images."""
    width, depth, size = SIZES["demo"]
    torch.manual_seed(0)
    build = lambda: build_model(3, 2, width, depth)
    states = []
    for _ in range(EXPERTS):
        m = build()
        with torch.no_grad():  # plausible running statistics for the eval-mode methods
            m(torch.randn(16, 3, size, size))
        states.append(m.state_dict())
    cfg = AdaptConfig()
    batches = list(torch.randn(images, 3, size, size).split(cfg.batch_size))
    speeds = {}
    for name in METHODS:
        build_method(name, states, build, cfg).adapt_and_predict(batches[:1])  # warm-up
        t0 = time.perf_counter()
        build_method(name, states, build, cfg).adapt_and_predict(batches)  # set-up (routing) included
        speeds[name] = images / (time.perf_counter() - t0)
    return speeds


def to_markdown(rows: list[dict], speeds: dict[str, float], env: dict) -> str:
    header = (f"Forward + backward, batch {BATCH}, {EXPERTS} experts; median seconds (min in brackets), "
              f"timed round-robin; torch {env['torch']}, {env['threads']} threads, "
              f"load average {env['load_before']} → {env['load_after']}:")
    lines = [header, "",
             "| size | plain (floor) | routed | naive per-sample loop | routed / plain | naive / routed |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} ({r['width']}w, depth {r['depth']}, {r['image']} px, {r['repeats']} rep.) | "
                     f"{r['plain_s']:.4f} ({r['plain_min_s']:.4f}) | {r['routed_s']:.4f} ({r['routed_min_s']:.4f}) | "
                     f"{r['naive_s']:.4f} ({r['naive_min_s']:.4f}) | {r['routed_over_plain']:.2f}× | "
                     f"{r['naive_over_routed']:.2f}× |")
    demo = [f"{r['size']} {'met' if r['routed_over_plain'] <= DEMO_TARGET else 'MISSED'}"
            for r in rows if r["size"] == "demo"]
    loop = [f"{r['size']} {'met' if r['naive_over_routed'] > 1 else 'MISSED'}" for r in rows]
    lines += ["", (f"Targets: routed / plain ≤ {DEMO_TARGET} at demo size: {', '.join(demo) or 'not run'}; "
              f"routed faster than the loop: {', '.join(loop)}."), ""]
    lines += [(f"Whole-site adaptation at demo size ({SITE_IMAGES} images, batches of 8, 1 step per batch, "
               f"1 pass, {EXPERTS} experts, set-up included):"), "", "| method | images/s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in speeds.items()]
    return "\n".join(lines) + "\n"


def _load() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats at demo size")
    parser.add_argument("--published-repeats", type=int, default=2, help="timed repeats at published size")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
           "cpus": os.cpu_count(), "load_before": _load()}
    rows = [bench_models(name, args.published_repeats if name == "published" else args.repeats)
            for name in args.sizes]
    speeds = bench_methods()
    env["load_after"] = _load()
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_routing.json").write_text(json.dumps({"env": env, "models": rows, "adapt_images_per_s": speeds},
                                                       indent=2))
    table = to_markdown(rows, speeds, env)
    (OUT / "bench_routing.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
