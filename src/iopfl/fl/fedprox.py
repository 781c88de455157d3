"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Client k minimises its loss plus a proximal term to the round's global model,
    F_k(w) + (μ/2)·‖w − θ^{t-1}‖²   over the parameters w,
which adds μ(w − θ^{t-1}) to every gradient and keeps local models from drifting. Server: FedAvg.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from iopfl.fl.aggregation import StateDict
from iopfl.fl.base import ClientReply, Strategy, StrategyParams
from iopfl.fl.training import LocalTrainer


def proximal_term(anchor: StateDict, weight: float):
    """(weight/2)·Σ‖p − anchor[p]‖² over the model's parameters (a penalty for LocalTrainer).

    Its gradient is weight·(p − anchor[p]). The anchor is a frozen copy taken now, so the penalty
    stays valid even if the caller's tensors are live weights that training will change; it moves to
    the model's device once, at the first step.
    """
    frozen = {k: v.detach().clone() for k, v in anchor.items()}

    def penalty(model: nn.Module) -> torch.Tensor:
        terms = []
        for n, p in model.named_parameters():
            if frozen[n].device != p.device:
                frozen[n] = frozen[n].to(p.device)
            terms.append(((p - frozen[n]) ** 2).sum())
        return 0.5 * weight * sum(terms, torch.zeros(()))

    return penalty


class FedProxParams(StrategyParams):
    mu: float = Field(0.01, ge=0.0, description="proximal weight μ")


class FedProx(Strategy):
    name = "fedprox"
    Params = FedProxParams
    params: FedProxParams

    def client_round(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> ClientReply:
        result = trainer.train(global_weights, generator, penalty=proximal_term(global_weights, self.params.mu))
        return ClientReply(result.weights, trainer.num_samples, {"loss": result.loss})
