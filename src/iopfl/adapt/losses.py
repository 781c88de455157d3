"""Unsupervised objectives of test-time adaptation (DESIGN §2.2): entropy, consistency, shape.

Every function takes softmax probabilities ``[B, K, H, W]`` (K classes, class 0 = background) or
inputs ``[B, C, H, W]`` and returns a scalar tensor; none of them ever sees a label.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel Shannon entropy of ``probs [B, K, H, W]`` divided by log K: 1 = uniform, 0 = certain."""
    k = probs.shape[1]
    return -(probs * torch.log(probs.clamp_min(1e-8))).sum(dim=1).mean() / math.log(k)


@dataclass(frozen=True)
class Transforms:
    """Per-sample dihedral transform T: optional horizontal flip, then ``turns`` quarter turns.

    ``flips`` is bool ``[B]``, ``turns`` int64 ``[B]`` in {0, 1, 2, 3}.
    """

    flips: torch.Tensor
    turns: torch.Tensor

    @staticmethod
    def draw(batch: int, generator: torch.Generator, square: bool = True) -> Transforms:
        """Random T per sample; on non-square images only half turns keep the shape."""
        flips = torch.randint(0, 2, (batch,), generator=generator).bool()
        turns = torch.randint(0, 4, (batch,), generator=generator)
        return Transforms(flips, turns if square else 2 * (turns % 2))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """T(x) on ``[B, C, H, W]``."""
        return self._by_group(x, lambda xs, f, k: torch.rot90(xs.flip(-1) if f else xs, k, dims=(-2, -1)))

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """T⁻¹(y) on ``[B, C, H, W]``: rotate back, then un-flip."""
        def undo(ys: torch.Tensor, f: bool, k: int) -> torch.Tensor:
            ys = torch.rot90(ys, -k, dims=(-2, -1))
            return ys.flip(-1) if f else ys
        return self._by_group(y, undo)

    def _by_group(self, x: torch.Tensor, fn: Callable[[torch.Tensor, bool, int], torch.Tensor]) -> torch.Tensor:
        # at most 8 distinct transforms: loop over those, never over samples
        code = self.flips.long() * 4 + self.turns
        parts, order = [], []
        for c in code.unique().tolist():
            idx = (code == c).nonzero().flatten()
            parts.append(fn(x[idx], bool(c // 4), c % 4))
            order.append(idx)
        return torch.cat(parts)[torch.cat(order).argsort()]


def consistency(model: Model, x: torch.Tensor, probs: torch.Tensor, noise_std: float,
                generator: torch.Generator) -> torch.Tensor:
    """mean over pixels of ‖T⁻¹(softmax(f(T(x + ε)))) − p‖², ε ~ N(0, σ²) per pixel.

    Shapes: ``x [B, C, H, W]``, ``probs`` = p = softmax(f(x)) ``[B, K, H, W]``. Noise and T are drawn
    from ``generator``. p is the target (detached): the perturbed view is pulled toward the clean
    prediction, not both toward each other, which would reward a constant output.
    """
    noise = noise_std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    t = Transforms.draw(x.shape[0], generator, square=x.shape[-1] == x.shape[-2])
    view = t.invert(model(t.apply(x + noise)).softmax(dim=1))
    return ((view - probs.detach()) ** 2).sum(dim=1).mean()


def shape_kernel(image_size: int, configured: int | None = None) -> int:
    """Window of the morphological gradient: ``configured``, else 21 px at 384 px scaled with the
    image size; always odd (a centred window) and at least 3."""
    k = configured if configured is not None else round(21 * image_size / 384)
    k = max(3, k)
    return k if k % 2 else k + 1


def shape_term(probs: torch.Tensor, kernel: int) -> torch.Tensor:
    """Mean over pixels of the morphological gradient maxpool_k(q) − minpool_k(q) of the foreground
    probability q = 1 − p_background (``probs [B, K, H, W]`` → q ``[B, 1, H, W]``).

    Each pixel's value is in [0, 1] and large near boundaries and fragments, so the mean is the
    fraction of the image within k/2 px of an edge: it favours few, compact, smooth shapes.
    """
    q = 1.0 - probs[:, :1]
    pad = kernel // 2
    # max-pool pads with -inf, so borders see only real pixels on both sides
    dilated = F.max_pool2d(q, kernel, stride=1, padding=pad)
    eroded = -F.max_pool2d(-q, kernel, stride=1, padding=pad)
    return (dilated - eroded).mean()
