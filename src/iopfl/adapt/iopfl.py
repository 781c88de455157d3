"""``iopfl``: IOP-FL outside personalization (Jiang, Yang, Chen, Dou, "IOP-FL: Inside-Outside
Personalization for Federated Medical Image Segmentation", IEEE TMI 42(7), 2023; DESIGN §2.2).

The unseen site's model routes among the experts — the val-selected global model θ* and every inside
client's val-selected φ_k* — layer by layer and sample by sample (``iopfl.models.routing``): each
(transposed) convolution applies W̃ = Σ_e r_e·W^e with gates r = sigmoid(MLP(GAP(h))). Normalisation
comes from θ* and uses test-batch statistics. On each incoming unlabelled batch x, every routing MLP
and the normalisation affine parameters take ``steps_per_batch`` Adam steps on

    L = λ_H·H + λ_C·C + λ_S·S,    p = softmax(f(x)),

    H = mean per-pixel entropy of p / log K,
    C = mean ‖T⁻¹(softmax(f(T(x + ε)))) − p‖²   (ε ~ N(0, σ²); T = random flip + quarter turns per sample),
    S = mean of maxpool_k(q) − minpool_k(q),  q = 1 − p_background  (k = 21 px at 384 px, scaled),

then the batch is predicted with dropout off. Published weights λ_H = 10, λ_C = 0.1; λ_S = 1 here
(see ``AdaptConfig``). A term with weight 0 is skipped (no extra forward pass).
"""

import torch
from torch import nn

from iopfl.adapt.base import TTAMethod
from iopfl.adapt.losses import consistency, entropy, shape_kernel, shape_term
from iopfl.models.routing import norm_affine_parameters, route_experts, routing_parameters


class IOPFLRouting(TTAMethod):
    name = "iopfl"

    def make_model(self) -> nn.Module:
        return route_experts(self.experts, self.build, self.config.gate_norm)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return routing_parameters(model) + norm_affine_parameters(model)

    def loss(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """L on the unlabelled batch ``x [B, C, H, W]``."""
        c = self.config
        probs = model(x).softmax(dim=1)
        total = c.lambda_entropy * entropy(probs)
        if c.lambda_consistency:
            total = total + c.lambda_consistency * consistency(model, x, probs, c.noise_std, generator)
        if c.lambda_shape:
            k = shape_kernel(max(x.shape[-2:]), c.shape_kernel)
            total = total + c.lambda_shape * shape_term(probs, k)
        return total
