"""APFL (Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning", arXiv:2003.13461, 2020).

Each client keeps a local model v_k and a mixing weight α_k. Per round: the shared model is trained as
in FedAvg (w_k from θ^{t-1}) and sent; then v_k is trained on the loss of the parameter-space mixture
    v̄_k = α_k·v_k + (1 − α_k)·w_k
(only v_k, and α_k when ``apfl_learn_alpha``, receive gradients; α_k is kept in [0, 1]). The
personalised model is v̄_k. v_k and α_k never leave the client.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from iopfl.fl.aggregation import StateDict
from iopfl.fl.base import ClientReply, Strategy
from iopfl.fl.training import LocalTrainer

ALPHA = "apfl.alpha"


def mixture(local: StateDict, shared: StateDict, alpha: float) -> StateDict:
    """α·local + (1−α)·shared for floating tensors; buffers such as step counters from ``local``."""
    return {k: alpha * v + (1 - alpha) * shared[k] if v.is_floating_point() else v.clone()
            for k, v in local.items()}


class APFL(Strategy):
    name = "apfl"
    models = ("global", "personalized")

    def client_round(self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict,
                     generator: torch.Generator) -> ClientReply:
        reply = super().client_round(trainer, global_weights, personal, generator)
        shared = reply.weights
        alpha = personal[ALPHA].clone() if personal else torch.tensor(self.config.apfl_alpha)
        alpha.requires_grad_(self.config.apfl_learn_alpha)
        model = trainer.model

        def mixed_forward(x: torch.Tensor) -> torch.Tensor:
            a = alpha.clamp(0.0, 1.0)
            params = {n: a * p + (1 - a) * shared[n] for n, p in model.named_parameters()}
            return functional_call(model, params, (x,))

        local_start = {k: v for k, v in personal.items() if k != ALPHA} or global_weights
        extra = [alpha] if self.config.apfl_learn_alpha else []
        local = trainer.train(local_start, generator, forward=mixed_forward, extra_params=extra).weights
        reply.personal = {**local, ALPHA: alpha.detach().clamp(0.0, 1.0).clone()}
        return reply

    def personalized_weights(self, trainer: LocalTrainer, global_weights: StateDict,
                             personal: StateDict, generator: torch.Generator) -> StateDict | None:
        if not personal:
            return None
        # the mixture with the *current* global model, as the model the site would use now
        local = {k: v for k, v in personal.items() if k != ALPHA}
        return mixture(local, global_weights, float(personal[ALPHA]))
