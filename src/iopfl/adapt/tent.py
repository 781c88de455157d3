"""``tent``: TENT (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021).

Normalisation uses test-batch statistics; the normalisation affine parameters (γ, β) take Adam steps
on the mean prediction entropy H(softmax(f(x))) of each batch.
"""

import torch
from torch import nn

from iopfl.adapt.bn import BNAdapt
from iopfl.adapt.losses import entropy
from iopfl.models.routing import norm_affine_parameters


class Tent(BNAdapt):
    name = "tent"

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        for p in model.parameters():
            p.requires_grad_(False)
        params = norm_affine_parameters(model)
        for p in params:
            p.requires_grad_(True)
        return params

    def loss_terms(
        self, model: nn.Module, x: torch.Tensor, generator: torch.Generator, reference: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        return {"entropy": entropy(model(x).softmax(dim=1))}
