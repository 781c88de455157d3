"""Weight arithmetic shared by the strategies: copies, weighted means and EMA over state dicts.

A state dict here holds every parameter and every normalisation buffer. Integer buffers (BatchNorm's
``num_batches_tracked``) are averaged in float64 and rounded back, as the published code does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from iopfl.models.factory import StateDict


def clone_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Deep copy, detached, on the CPU: nothing shares storage with a live model."""
    return {k: v.detach().to("cpu", copy=True).clone() for k, v in state.items()}


def _cast_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.is_floating_point():
        return value.to(like.dtype)
    return value.round().to(like.dtype)


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """Σ_i w_i·state_i / Σ_i w_i over the keys of the first state (all must share them).

    Used for FedAvg: θ = Σ_k n_k θ_k / Σ_k n_k.
    """
    if not states or len(states) != len(weights):
        raise ValueError("weighted_average needs one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weighted_average needs a positive total weight")
    out: StateDict = {}
    for key, first in states[0].items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            acc += state[key].to(torch.float64) * (w / total)
        out[key] = _cast_like(acc, first)
    return out


def ema(previous: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], alpha: float) -> StateDict:
    """α·previous + (1−α)·current for floating tensors; integer buffers take ``current``."""
    out: StateDict = {}
    for key, cur in current.items():
        if cur.is_floating_point():
            out[key] = (alpha * previous[key] + (1.0 - alpha) * cur).detach().clone()
        else:
            out[key] = cur.detach().clone()
    return out


def merge_states(base: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> StateDict:
    """A copy of ``base`` with the keys of ``update`` replaced (e.g. shared body + local head)."""
    out = clone_state(base)
    out.update(clone_state(update))
    return out
