"""Label-free safeguard of test-time adaptation (docs/METHOD.md, "Outside safety").

Every term of an unlabelled objective (entropy, consistency, shape) is minimised by an empty
prediction, so an adaptive method can drift to "everything background" — or flood the image — with
nothing in its loss to stop it, and a hospital has no labels to notice. After every batch the adapted
prediction is compared with BN-adapt's prediction of the same batch (the global model with the
batch's statistics, which never takes a step and so cannot drift):

- ``empty``: BN-adapt finds foreground, the adapted model ``safeguard_foreground`` times less;
- ``flood``: the adapted model finds ``safeguard_foreground`` times more foreground than BN-adapt
  (at least 1 % of the pixels, so a few stray pixels on an empty batch do not count);
- ``disagree``: the two foreground masks overlap with a Dice below ``safeguard_agreement``;
- ``gates``: a routed layer's mean gate sum is more than twice or less than half its sum on the
  pass's first batch (raw sigmoid gates rescaling the kernels instead of mixing them; on the simplex
  the sum is always 1).

Thresholds (``adapt.safeguard_agreement`` 0.8, ``adapt.safeguard_foreground`` 1.5) were first 0.5 and 4,
fixed in advance; on the real Kvasir-SEG hold-out TENT then drifted slowly to ~55 % of BN-adapt's
foreground at an agreement of ~0.7 without tripping them (and lost 14 Dice points), so they were
tightened to catch a drift, not only a collapse (docs/results.md, "Outside safety study").

The predicted foreground fraction, the mean entropy and the gates' spread are recorded per batch for
the trace as well. The inside sites' own foreground fraction is not used: a target site's lesions may
be larger or smaller than theirs, while BN-adapt sees the same images as the adapted model.

A batch that fails rolls the method back to where it started (parameters and optimiser moments: for
TENT that is BN-adapt itself) and is predicted again from there; if that
still fails, the batch gets BN-adapt's prediction (``reference``). Each fallback is counted by
reason. Back to the start rather than to the last batch that passed: measured on the Kvasir-SEG
hold-out, TENT drifted slowly, every batch passing just above the thresholds, so the last passing
state was already most of the way to where the check fails (TENT still 3.5 points below BN-adapt).
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from iopfl.adapt.config import AdaptConfig

EMPTY_FRACTION = 1e-3  # BN-adapt foreground below this: nothing to lose by predicting background
FLOOD_FLOOR = 0.01  # flooding needs at least 1 % foreground pixels
GATE_SCALE = 2.0  # a layer's gate sum may grow or shrink by at most this factor


@dataclass(frozen=True)
class BatchSignals:
    """Label-free signals of one predicted batch."""

    foreground: float  # fraction of pixels the adapted model calls foreground
    reference_foreground: float  # the same for BN-adapt
    agreement: float  # Dice of the two foreground masks (1 when both are empty)
    entropy: float  # mean per-pixel entropy / log K of the adapted prediction
    gate_scale: float | None  # largest factor by which a layer's mean gate sum left its start
    gate_spread: float | None  # mean over layers of (largest − smallest mean gate)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def foreground_masks(probs: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` bool: pixels whose most probable class is not background (``probs [B, K, H, W]``)."""
    return probs.argmax(dim=1) > 0


def batch_signals(
    probs: torch.Tensor,
    reference: torch.Tensor,
    gate_sums: torch.Tensor | None = None,
    start_sums: torch.Tensor | None = None,
    spread: float | None = None,
) -> BatchSignals:
    """Signals of ``probs`` against BN-adapt's ``reference`` (both ``[B, K, H, W]``); ``gate_sums`` and
    ``start_sums`` ``[L]``: each routed layer's mean gate sum now and at the start."""
    a, r = foreground_masks(probs), foreground_masks(reference)
    both = (a & r).sum().item()
    total = a.sum().item() + r.sum().item()
    entropy = -(probs * probs.clamp_min(1e-8).log()).sum(dim=1).mean().item() / math.log(probs.shape[1])
    scale = None
    if gate_sums is not None and start_sums is not None:
        scale = (gate_sums / start_sums).log().abs().max().exp().item()
    return BatchSignals(
        foreground=a.float().mean().item(),
        reference_foreground=r.float().mean().item(),
        agreement=1.0 if total == 0 else 2 * both / total,
        entropy=entropy,
        gate_scale=scale,
        gate_spread=spread,
    )


def collapse_reason(s: BatchSignals, config: AdaptConfig) -> str | None:
    """Why the batch looks collapsed (``empty``, ``flood``, ``disagree``, ``gates``), or None."""
    ratio = config.safeguard_foreground
    if s.reference_foreground >= EMPTY_FRACTION and s.foreground * ratio < s.reference_foreground:
        return "empty"
    if s.foreground >= FLOOD_FLOOR and s.foreground > ratio * s.reference_foreground:
        return "flood"
    if s.agreement < config.safeguard_agreement:
        return "disagree"
    if s.gate_scale is not None and s.gate_scale > GATE_SCALE:
        return "gates"
    return None


class SafeState:
    """A state to return to: the trainable parameters and the optimiser's moments. The normalisation
    stream (the pooled statistics of the images seen so far) is not rolled back: it describes the
    data, not what the method learnt, and BN-adapt keeps it too."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.tensors = [p.detach().clone() for p in self.params]
        self.moments = copy.deepcopy(optimizer.state_dict())

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in zip(self.params, self.tensors, strict=True):
            p.copy_(saved)
        self.optimizer.load_state_dict(self.moments)


class FallbackLog:
    """How many batches fell back, why, and how many of them got BN-adapt's prediction."""

    def __init__(self) -> None:
        self.batches = 0
        self.reasons: Counter[str] = Counter()
        self.to_reference = 0

    def add(self, reason: str | None, to_reference: bool = False) -> None:
        self.batches += 1
        if reason:
            self.reasons[reason] += 1
        self.to_reference += to_reference

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> dict[str, Any]:
        """``{"batches": N, "fallbacks": n, "reasons": {reason: n}, "to_bn": n}`` (the last pass)."""
        return {
            "batches": self.batches,
            "fallbacks": self.total,
            "reasons": dict(sorted(self.reasons.items())),
            "to_bn": self.to_reference,
        }
