"""Segmentation losses: soft Dice (the published recipe), optionally plus cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over classes (background included), computed over the whole batch.

    Args:
        logits: ``[B, K, H, W]`` raw scores.
        target: ``[B, H, W]`` integer class map in ``[0, K)``.
    """
    k = logits.shape[1]
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target.long(), k).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ce_weight: float = 0.0) -> torch.Tensor:
    """Soft Dice, plus ``ce_weight`` x cross-entropy when ``ce_weight > 0``."""
    loss = soft_dice_loss(logits, target)
    if ce_weight > 0:
        loss = loss + ce_weight * F.cross_entropy(logits, target.long())
    return loss
