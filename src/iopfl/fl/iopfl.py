"""IOP-FL inside personalisation (Jiang, Yang, Chen, Dou, "IOP-FL: Inside-Outside Personalization
for Federated Medical Image Segmentation", IEEE TMI 42(7), 2023).

Client k in round t trains θ_k^t from θ^{t-1} (as FedAvg) and updates its personalised model

    φ_k^t = θ_k^t                                on its first participation,
    φ_k^t = α·φ_k^{t-1} + (1−α)·θ_k^t             afterwards (α = 0.1 by default),

equivalently φ_k^t = φ_k^{t-1} − (1−α)·[(φ_k^{t-1} − θ^{t-1}) + Δ_k^t] with Δ_k^t = θ^{t-1} − θ_k^t:
a step that accumulates the global update and the client's own local gradient. φ_k covers every
parameter and normalisation buffer, and it never leaves the client: only θ_k^t and n_k are sent.
The server aggregates as FedAvg.
"""

from __future__ import annotations

import torch
from pydantic import Field

from iopfl.fl.aggregation import StateDict, clone_state, ema
from iopfl.fl.base import ClientReply, Strategy, StrategyParams
from iopfl.fl.training import LocalTrainer
from iopfl.results import GLOBAL, PERSONALIZED


class IOPFLParams(StrategyParams):
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="EMA weight of the old φ")


class IOPFLInside(Strategy):
    name = "iopfl"
    models = (GLOBAL, PERSONALIZED)
    Params = IOPFLParams
    params: IOPFLParams

    def client_round(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> ClientReply:
        reply = super().client_round(trainer, global_weights, personal, generator)
        reply.personal = self.update_personal(personal, reply.weights)
        return reply

    def update_personal(self, personal: StateDict, local: StateDict) -> StateDict:
        """φ ← θ_k on first participation (empty ``personal``), else α·φ + (1−α)·θ_k."""
        if not personal:
            return clone_state(local)
        return ema(personal, local, self.params.alpha)

    def personalized_weights(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> StateDict | None:
        return personal or None
