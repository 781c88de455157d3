"""Ditto (Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021).

The global part is FedAvg. Each client also keeps a personal model v_k, trained every round for the
local epochs on F_k(v) + (λ/2)·‖v − θ^{t-1}‖² (v_k starts from θ on the first round). v_k never leaves
the client and is the site's personalised model.
"""

from __future__ import annotations

import torch
from pydantic import Field

from iopfl.fl.aggregation import StateDict
from iopfl.fl.base import ClientReply, Strategy, StrategyParams
from iopfl.fl.fedprox import proximal_term
from iopfl.fl.training import LocalTrainer
from iopfl.results import GLOBAL, PERSONALIZED


class DittoParams(StrategyParams):
    ditto_lambda: float = Field(0.1, ge=0.0, description="proximal weight λ of the personal model")


class Ditto(Strategy):
    name = "ditto"
    models = (GLOBAL, PERSONALIZED)
    Params = DittoParams
    params: DittoParams

    def client_round(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> ClientReply:
        reply = super().client_round(trainer, global_weights, personal, generator)
        penalty = proximal_term(global_weights, self.params.ditto_lambda)
        reply.personal = trainer.train(personal or global_weights, generator, penalty=penalty).weights
        return reply

    def personalized_weights(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> StateDict | None:
        return personal or None
