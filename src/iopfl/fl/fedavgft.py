"""FedAvg + local fine-tuning: the FedAvg global model, fine-tuned on each site for
``finetune_epochs`` local epochs at evaluation time to give that site's personalised model.

Training and communication are FedAvg's (McMahan et al., AISTATS 2017); φ_k = LocalTrain_{E_ft}(θ^t).
The fine-tuning works on a copy: the global weights are never changed by it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from iopfl.fl.aggregation import StateDict
from iopfl.fl.base import Strategy, StrategyParams
from iopfl.fl.training import LocalTrainer
from iopfl.results import GLOBAL, PERSONALIZED


class FedAvgFTParams(StrategyParams):
    finetune_epochs: int = Field(1, ge=0, description="local fine-tuning epochs at evaluation (0: none)")


class FedAvgFT(Strategy):
    name = "fedavgft"
    models = (GLOBAL, PERSONALIZED)
    Params = FedAvgFTParams
    params: FedAvgFTParams

    def personalized_weights(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> StateDict | None:
        if self.params.finetune_epochs == 0:
            return None
        return trainer.train(global_weights, generator, epochs=self.params.finetune_epochs).weights
