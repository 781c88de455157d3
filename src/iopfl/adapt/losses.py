"""Unsupervised objectives of test-time adaptation (docs/METHOD.md §2): entropy, consistency, shape."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel Shannon entropy of ``probs [B, K, H, W]`` divided by log K (1 = uniform)."""
    k = probs.shape[1]
    return -(probs * torch.log(probs.clamp_min(1e-8))).sum(dim=1).mean() / math.log(k)


def draw_transforms(batch: int, generator: torch.Generator) -> tuple[list[bool], list[int]]:
    """Per sample: horizontal flip or not, and a number of quarter turns."""
    flips = torch.randint(0, 2, (batch,), generator=generator).bool().tolist()
    turns = torch.randint(0, 4, (batch,), generator=generator).tolist()
    return flips, turns


def apply_transforms(x: torch.Tensor, flips: list[bool], turns: list[int]) -> torch.Tensor:
    """T(x) per sample on ``[B, C, H, W]`` (square images): flip, then rotate."""
    out = [torch.rot90(xi.flip(-1) if f else xi, k, dims=(-2, -1)) for xi, f, k in zip(x, flips, turns)]
    return torch.stack(out)


def invert_transforms(y: torch.Tensor, flips: list[bool], turns: list[int]) -> torch.Tensor:
    """T⁻¹(y): rotate back, then un-flip."""
    out = [torch.rot90(yi, -k, dims=(-2, -1)) for yi, k in zip(y, turns)]
    return torch.stack([yi.flip(-1) if f else yi for yi, f in zip(out, flips)])


def consistency(model: Model, x: torch.Tensor, probs: torch.Tensor, noise_std: float,
                generator: torch.Generator) -> torch.Tensor:
    """mean ‖T⁻¹(softmax(f(T(x + ε)))) − p‖² over pixels, ε ~ N(0, σ²) per pixel.

    The prediction on the clean input ``probs`` is the target (detached), so the objective pulls the
    perturbed view towards it rather than both towards each other.
    """
    noise = noise_std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    flips, turns = draw_transforms(x.shape[0], generator)
    view = invert_transforms(model(apply_transforms(x + noise, flips, turns)).softmax(dim=1), flips, turns)
    return ((view - probs.detach()) ** 2).sum(dim=1).mean()


def shape_kernel(image_size: int, configured: int | None = None) -> int:
    """Window of the morphological gradient: 21 px at 384 px, scaled, odd, at least 3."""
    k = configured or max(3, round(21 * image_size / 384))
    return k if k % 2 else k + 1


def shape_term(probs: torch.Tensor, kernel: int) -> torch.Tensor:
    """Mean morphological gradient maxpool_k(q) − minpool_k(q) of the foreground probability
    q = 1 − p_background: in [0, 1] per pixel, large on boundaries and fragments."""
    q = 1.0 - probs[:, :1]
    pad = kernel // 2
    dilated = F.max_pool2d(q, kernel, stride=1, padding=pad)
    eroded = -F.max_pool2d(-q, kernel, stride=1, padding=pad)
    return (dilated - eroded).mean()
