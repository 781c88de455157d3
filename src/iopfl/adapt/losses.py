"""Unsupervised objectives of test-time adaptation (docs/METHOD.md §2): entropy, consistency, shape."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from iopfl.seeding import normal_on

Model = Callable[[torch.Tensor], torch.Tensor]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel Shannon entropy of ``probs [B, K, H, W]`` divided by log K (1 = uniform)."""
    k = probs.shape[1]
    return -(probs * torch.log(probs.clamp_min(1e-8))).sum(dim=1).mean() / math.log(k)


def published_entropy(probs: torch.Tensor) -> torch.Tensor:
    """The published script's entropy of ``probs [B, K, H, W]`` (med-air/IOP-FL, utils/loss.py line 21):
    −p·log(p + 1e-6) summed over the BATCH axis, / log K, averaged over classes and pixels — i.e.
    B/K times the per-pixel entropy, so its weight grows with the batch size."""
    k = probs.shape[1]
    return (-(probs * torch.log(probs + 1e-6)).sum(dim=0) / math.log(k)).mean()


def anchor(probs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Trust region: mean per-pixel KL(reference ‖ probs) in nats, both ``[B, K, H, W]``; the reference
    (BN-adapt's prediction) is a fixed target. 0 when the two agree; empty-prediction collapse pays
    −log p(foreground) on every pixel the reference calls foreground."""
    ref = reference.detach()
    return (ref * (ref.clamp_min(1e-8).log() - probs.clamp_min(1e-8).log())).sum(dim=1).mean()


def draw_transforms(batch: int, generator: torch.Generator) -> tuple[list[bool], list[int]]:
    """Per sample: horizontal flip or not, and a number of quarter turns."""
    flips = torch.randint(0, 2, (batch,), generator=generator).bool().tolist()
    turns = torch.randint(0, 4, (batch,), generator=generator).tolist()
    return flips, turns


def apply_transforms(x: torch.Tensor, flips: list[bool], turns: list[int]) -> torch.Tensor:
    """T(x) per sample on ``[B, C, H, W]`` (square images): flip, then rotate."""
    out = [torch.rot90(xi.flip(-1) if f else xi, k, dims=(-2, -1)) for xi, f, k in zip(x, flips, turns, strict=True)]
    return torch.stack(out)


def invert_transforms(y: torch.Tensor, flips: list[bool], turns: list[int]) -> torch.Tensor:
    """T⁻¹(y): rotate back, then un-flip."""
    out = [torch.rot90(yi, -k, dims=(-2, -1)) for yi, k in zip(y, turns, strict=True)]
    return torch.stack([yi.flip(-1) if f else yi for yi, f in zip(out, flips, strict=True)])


def consistency(
    model: Model,
    x: torch.Tensor,
    probs: torch.Tensor,
    noise_std: float,
    generator: torch.Generator,
    detach_target: bool = True,
) -> torch.Tensor:
    """mean ‖T⁻¹(softmax(f(T(x + ε)))) − p‖² over pixels, ε ~ N(0, σ²) per pixel, for ``x [B, C, H, W]``
    and the clean prediction ``probs [B, K, H, W]``.

    By default the clean prediction is the target (detached), so the objective pulls the perturbed view
    towards it rather than both towards each other. ``detach_target=False`` lets gradients flow into
    both branches, as the published script does (its clean branch is not detached).
    """
    noise = noise_std * normal_on(tuple(x.shape), generator, x.device).to(x.dtype)
    flips, turns = draw_transforms(x.shape[0], generator)
    view = invert_transforms(model(apply_transforms(x + noise, flips, turns)).softmax(dim=1), flips, turns)
    target = probs.detach() if detach_target else probs
    return ((view - target) ** 2).sum(dim=1).mean()


def shape_kernel(image_size: int, configured: int | None = None) -> int:
    """Window of the morphological gradient: 21 px at 384 px, scaled, odd, at least 3."""
    k = configured or max(3, round(21 * image_size / 384))
    return k if k % 2 else k + 1


def shape_term(probs: torch.Tensor, kernel: int) -> torch.Tensor:
    """Mean morphological gradient maxpool_k(q) − minpool_k(q) of the foreground probability
    q = 1 − p_background: in [0, 1] per pixel, large on boundaries and fragments."""
    q = 1.0 - probs[:, :1]
    return morphological_gradient(q, kernel).mean()


def published_shape_term(probs: torch.Tensor, kernel: int) -> torch.Tensor:
    """The published script's smoothness term (med-air/IOP-FL, federated/model_trainer_segmentation.py
    lines 14-20 and 116): 1e-6 · ‖maxpool_k(q) − minpool_k(q)‖₂, the Euclidean norm over the whole
    batch of the foreground channels q = ``probs[:, 1:]`` — tiny next to the other terms."""
    return 1e-6 * torch.linalg.vector_norm(morphological_gradient(probs[:, 1:], kernel))


def morphological_gradient(q: torch.Tensor, kernel: int) -> torch.Tensor:
    """maxpool_k(q) − minpool_k(q) per channel of ``q [B, C, H, W]`` (same shape, stride 1)."""
    pad = kernel // 2
    dilated = F.max_pool2d(q, kernel, stride=1, padding=pad)
    eroded = -F.max_pool2d(-q, kernel, stride=1, padding=pad)
    return dilated - eroded
