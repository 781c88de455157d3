"""APFL (Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning", arXiv:2003.13461, 2020).

Each client keeps a local model v_k and a mixing weight α_k. Per round:
1. the shared model is trained as in FedAvg, w_k = LocalTrain(θ^{t-1}), and w_k is sent;
2. v_k is trained on the loss of the parameter-space mixture (Algorithm 1 of the paper)
       v̄_k = α_k·v_k + (1 − α_k)·w_k,
   so v_k's gradient is α_k·∇F_k(v̄_k); with ``apfl_learn_alpha`` α_k is trained too, by its
   gradient ⟨v_k − w_k, ∇F_k(v̄_k)⟩, and projected back onto [0, 1] after every step.
v_k (all its parameters and buffers) and α_k (a 0-d tensor under the key ``apfl.alpha``) never leave
the client; v_k starts from the global model of the client's first round, α_k from ``apfl_alpha``.

The personalised model is v̄_k = α_k·v_k + (1 − α_k)·θ^t with the current global model. Only the
*parameters* are mixed: the normalisation statistics are v_k's buffers, which were collected while the
mixture itself ran on the site's data (mixing them with the global statistics would describe no network).

Deviations from the paper, both forced by reusing the shared local trainer: the two updates run one
after the other (w_k for the local epochs, then v_k against the finished w_k) rather than interleaved
step by step, and they use the shared optimiser (Adam, so α moves by about the learning rate per step)
rather than plain SGD.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from iopfl.fl.aggregation import StateDict
from iopfl.fl.base import ClientReply, Strategy, StrategyParams
from iopfl.fl.training import LocalTrainer
from iopfl.results import GLOBAL, PERSONALIZED

ALPHA = "apfl.alpha"


def mixture(local: StateDict, shared: StateDict, alpha: float, params: Collection[str]) -> StateDict:
    """α·local + (1−α)·shared on the keys in ``params``; every other entry (buffers) from ``local``."""
    return {
        k: (alpha * v + (1 - alpha) * shared[k]).detach().clone() if k in params else v.detach().clone()
        for k, v in local.items()
    }


def mixed_forward(model: nn.Module, shared: StateDict, alpha: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ f(x; α·v + (1−α)·w)`` with v the live parameters of ``model`` and w = ``shared``.

    Gradients reach v (as α·∇f(v̄)) and α (as ⟨v − w, ∇f(v̄)⟩); ``shared`` is a constant. Buffers are the
    model's own (BatchNorm statistics of the mixture are accumulated into v's buffers).
    """
    fixed = {n: shared[n].detach().to(p.device) for n, p in model.named_parameters()}

    def forward(x: torch.Tensor) -> torch.Tensor:
        params = {n: alpha * p + (1 - alpha) * fixed[n] for n, p in model.named_parameters()}
        return functional_call(model, params, (x,))

    return forward


class APFLParams(StrategyParams):
    apfl_alpha: float = Field(0.5, ge=0.0, le=1.0, description="initial mixing weight α of the local model")
    apfl_learn_alpha: bool = Field(False, description="train α by its gradient (projected onto [0, 1])")


class APFL(Strategy):
    name = "apfl"
    models = (GLOBAL, PERSONALIZED)
    Params = APFLParams
    params: APFLParams

    def client_round(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> ClientReply:
        reply = super().client_round(trainer, global_weights, personal, generator)
        learn = self.params.apfl_learn_alpha
        alpha = (personal[ALPHA] if personal else torch.tensor(self.params.apfl_alpha)).detach().clone().float()
        alpha.requires_grad_(learn)

        def project() -> None:
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)

        local_start = {k: v for k, v in personal.items() if k != ALPHA} or global_weights
        local = trainer.train(
            local_start,
            generator,
            forward=mixed_forward(trainer.model, reply.weights, alpha),
            extra_params=[alpha] if learn else [],
            after_step=project if learn else None,
        )
        reply.personal = {**local.weights, ALPHA: alpha.detach().clone()}
        return reply

    def personalized_weights(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> StateDict | None:
        if not personal:
            return None
        local = {k: v for k, v in personal.items() if k != ALPHA}
        params = {n for n, _ in trainer.model.named_parameters()}
        return mixture(local, global_weights, float(personal[ALPHA]), params)
