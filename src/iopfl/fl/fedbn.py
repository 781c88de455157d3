"""FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization",
ICLR 2021).

As FedAvg, except that normalisation layers — found by module type, not by name — never leave the
client: their affine parameters and running statistics are personal state, the rest is sent and
averaged. Client k trains from θ^{t-1} with its own normalisation layers substituted (the global
model's on its first round). The reported model is personalised: shared weights + the site's
normalisation layers (the server's model has no meaningful normalisation layers of its own: they stay
θ^0's, so only ``models = ("personalized",)`` is reported).
"""

from __future__ import annotations

import torch
from torch import nn

from iopfl.fl.aggregation import StateDict, merge_states
from iopfl.fl.base import ClientReply, Strategy, split_reply
from iopfl.fl.training import LocalTrainer
from iopfl.models.routing import NORM_TYPES



def norm_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys (parameters and buffers) of every normalisation layer in ``model``."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys |= {f"{name}.{k}" if name else k for k in module.state_dict()}
    return keys


class FedBN(Strategy):
    name = "fedbn"
    models = ("personalized",)

    def client_round(self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict,
                     generator: torch.Generator) -> ClientReply:
        result = trainer.train(merge_states(global_weights, personal), generator)
        local = norm_state_keys(trainer.model)
        return split_reply(result.weights, trainer.num_samples, result.loss, local.__contains__)

    def personalized_weights(self, trainer: LocalTrainer, global_weights: StateDict,
                             personal: StateDict, generator: torch.Generator) -> StateDict | None:
        return merge_states(global_weights, personal) if personal else None
