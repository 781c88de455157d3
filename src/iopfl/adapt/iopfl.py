"""``iopfl``: IOP-FL outside personalization (Jiang et al., IEEE TMI 42(7), 2023).

The unseen site's model routes among the experts — the val-selected global model θ* and every inside
client's val-selected φ_k* — layer by layer and sample by sample (``iopfl.models.routing``). The
routers and the normalisation affine parameters are trained online on each unlabelled batch x with

    L = λ_H·H(p) + λ_C·C + λ_S·S,    p = softmax(f(x)),

H the per-pixel entropy / log K, C the consistency of T⁻¹(softmax(f(T(x + ε)))) with p (random flip and
quarter turns per sample, Gaussian ε with σ = ``noise_std``), S the mean morphological gradient of the
foreground probability (window 21 px at 384 px, scaled) which favours compact, smooth shapes.
Published weights λ_H = 10, λ_C = 0.1; λ_S = 1 by default (see README, "Outside").
"""

import torch
from torch import nn

from iopfl.adapt.base import TTAMethod
from iopfl.adapt.losses import consistency, entropy, shape_kernel, shape_term
from iopfl.models.routing import norm_affine_parameters, route_experts, routing_parameters


class IOPFLRouting(TTAMethod):
    needs_personal = True
    name = "iopfl"

    def make_model(self) -> nn.Module:
        return route_experts(self.experts, self.build, self.config.gate_norm)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return routing_parameters(model) + norm_affine_parameters(model)

    def loss(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        c = self.config
        probs = model(x).softmax(dim=1)
        total = c.lambda_entropy * entropy(probs)
        if c.lambda_consistency:
            total = total + c.lambda_consistency * consistency(model, x, probs, c.noise_std, generator)
        if c.lambda_shape:
            total = total + c.lambda_shape * shape_term(probs, shape_kernel(x.shape[-1], c.shape_kernel))
        return total
