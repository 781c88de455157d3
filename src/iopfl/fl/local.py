"""Local training: each site trains alone from θ^0 and never communicates.

Client k: φ_k^t = LocalTrain(φ_k^{t-1}) with φ_k^0 = θ^0; nothing is sent, so the server's model stays
θ^0 and only the personalised (local) models are reported. Not federated learning: the lower bound
that collaboration must beat.
"""

from __future__ import annotations

import torch

from iopfl.fl.aggregation import StateDict
from iopfl.fl.base import ClientReply, Strategy
from iopfl.fl.training import LocalTrainer
from iopfl.results import PERSONALIZED


class Local(Strategy):
    name = "local"
    federated = False
    models = (PERSONALIZED,)

    def client_round(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> ClientReply:
        result = trainer.train(personal or global_weights, generator)
        return ClientReply({}, trainer.num_samples, {"loss": result.loss}, result.weights)

    def personalized_weights(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> StateDict | None:
        return personal or None
