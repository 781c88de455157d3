"""``iopfl``: IOP-FL outside personalization (Jiang et al., IEEE TMI 42(7), 2023).

The unseen site's model routes among the experts — the val-selected global model θ* and every inside
client's val-selected φ_k* — layer by layer and sample by sample (``iopfl.models.routing``). The
routers and the normalisation affine parameters are trained online on each unlabelled batch x with

    L = λ_H·H(p) + λ_C·C + λ_S·S + λ_A·A,    p = softmax(f(x)),

H the per-pixel entropy / log K, C the consistency of T⁻¹(softmax(f(T(x + ε)))) with p (random flip and
quarter turns per sample, Gaussian ε with σ = ``noise_std``), S the mean morphological gradient of the
foreground probability (window 21 px at 384 px, scaled) which favours compact, smooth shapes.
Published weights λ_H = 10, λ_C = 0.1; λ_S = 1 by default (see docs/how-it-works.md, "Outside").

H, C and S are all minimised by an empty prediction (docs/METHOD.md, "Outside safety"). Two things
hold routing near a safe solution: gates on the simplex (``gate_norm=softmax``, the default: the
routed kernel is a mixture of the experts', never a rescaling), and the trust region A, the mean
per-pixel KL(p_bn ‖ p) from BN-adapt's prediction p_bn of the same batch (the global expert with the
batch's statistics, which takes no step) — the routed model may sharpen and move away from it only
as far as the other terms' evidence outweighs λ_A.

``adapt.protocol=published`` computes the three terms as the published script does (med-air/IOP-FL,
federated/model_trainer_segmentation.py lines 107-122): H summed over the batch axis
(``published_entropy``), C against a second clean forward pass with gradients into both branches and
averaged over classes too, S = 1e-6·‖morphological gradient‖₂ (``published_shape_term``).

The mean gate of every expert in every routed layer over the last pass's predictions is kept
(:meth:`IOPFLRouting.gate_summary`).
"""

from collections.abc import Sequence

import torch
from torch import nn

from iopfl.adapt.base import TTAMethod
from iopfl.adapt.losses import (
    anchor,
    consistency,
    entropy,
    published_entropy,
    published_shape_term,
    shape_kernel,
    shape_term,
)
from iopfl.models.routing import last_gates, norm_affine_parameters, route_experts, routed_layers, routing_parameters


class IOPFLRouting(TTAMethod):
    needs_personal = True
    name = "iopfl"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._layers: list[str] = []
        self._gate_sums: torch.Tensor | None = None  # [L, E] sums of gates over predicted samples
        self._samples = 0

    def make_model(self) -> nn.Module:
        c = self.config
        return route_experts(self.experts, self.build, c.gates, c.gate_init, c.min_batch_stats)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return routing_parameters(model) + norm_affine_parameters(model)

    def loss_terms(
        self, model: nn.Module, x: torch.Tensor, generator: torch.Generator, reference: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        c = self.config
        probs = model(x).softmax(dim=1)
        kernel = shape_kernel(x.shape[-1], c.shape_kernel)
        terms = {}
        if self.published:
            terms["entropy"] = c.lambda_entropy * published_entropy(probs)
            if c.lambda_consistency:
                # the published target is a separate clean forward pass (its own dropout mask), not
                # detached, and the squared error is averaged over classes as well (torch.mean, line 122)
                target = model(x).softmax(dim=1)
                cons = consistency(model, x, target, c.noise_std, generator, detach_target=False)
                terms["consistency"] = c.lambda_consistency * cons / probs.shape[1]
            if c.lambda_shape:
                terms["shape"] = c.lambda_shape * published_shape_term(probs, kernel)
            return terms
        terms["entropy"] = c.lambda_entropy * entropy(probs)
        if c.lambda_consistency:
            terms["consistency"] = c.lambda_consistency * consistency(model, x, probs, c.noise_std, generator)
        if c.lambda_shape:
            terms["shape"] = c.lambda_shape * shape_term(probs, kernel)
        if c.lambda_anchor and reference is not None:
            terms["anchor"] = c.lambda_anchor * anchor(probs, reference)
        return terms

    def gate_record(self, model: nn.Module) -> dict[str, list[float]]:
        """Per routed layer, over the last predicted batch: the mean gate sum and the smallest and
        largest gate (the trace's view of whether gates mix or rescale)."""
        sums, _ = self.gate_state(model)
        gates = last_gates(model)
        return {
            "gate_sum": [round(float(s), 4) for s in sums],
            "gate_min": [round(float(g.min()), 4) for g in gates],
            "gate_max": [round(float(g.max()), 4) for g in gates],
        }

    def gate_state(self, model: nn.Module) -> tuple[torch.Tensor, float]:
        gates = last_gates(model)  # each [B, E]
        sums = torch.stack([g.sum(dim=1).mean() for g in gates])
        spread = torch.stack([(g.max(dim=1).values - g.min(dim=1).values).mean() for g in gates]).mean()
        return sums, float(spread)

    def start_pass(self, model: nn.Module) -> None:
        self._layers = [name for name, _ in routed_layers(model)]
        self._gate_sums, self._samples = None, 0

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        probs = super().predict(model, x)
        gates = torch.stack([g.sum(dim=0) for g in last_gates(model)])
        self._gate_sums = gates if self._gate_sums is None else self._gate_sums + gates
        self._samples += x.shape[0]
        return probs

    def gate_summary(self, experts: Sequence[str]) -> dict:
        """Per routed layer, the mean gate of every expert over the samples predicted in the last pass:
        ``{"layers": [L names], "experts": [E names], "mean_gates": [L][E]}``."""
        if self._gate_sums is None:
            raise RuntimeError("gate_summary() before adapt_and_predict()")
        mean = (self._gate_sums / self._samples).tolist()
        return {"layers": list(self._layers), "experts": list(experts), "mean_gates": mean}
