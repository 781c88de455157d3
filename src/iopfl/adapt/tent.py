"""``tent``: TENT (Wang, Shelhamer, Liu, Olshausen, Darrell, "Tent: Fully Test-Time Adaptation by
Entropy Minimization", ICLR 2021).

Normalisation uses test-batch statistics (as ``bn``); on each incoming batch x the normalisation
affine parameters (γ, β) — and nothing else — take ``steps_per_batch`` Adam steps on

    H = mean over pixels of −Σ_k p_k log p_k / log K,   p = softmax(f(x)),

then the batch is predicted with the updated model.
"""

import torch
from torch import nn

from iopfl.adapt.bn import BNAdapt
from iopfl.adapt.losses import entropy
from iopfl.models.routing import norm_affine_parameters


class Tent(BNAdapt):
    name = "tent"

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        model.requires_grad_(False)  # gradients only where TENT adapts: no wasted weight gradients
        params = norm_affine_parameters(model)
        for p in params:
            p.requires_grad_(True)
        return params

    def loss(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return entropy(model(x).softmax(dim=1))
