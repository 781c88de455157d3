"""SiloBN (Andreux et al., "Siloed Federated Learning for Multi-Centric Histopathology Datasets",
MICCAI DCL workshop 2020).

As FedBN, but only the normalisation layers' *statistics* stay local: every BatchNorm's running mean
and variance (and its batch counter) never leave the client, while its affine parameters γ, β are
sent and averaged with the rest. Client k trains from θ^{t-1} with its own running statistics
substituted (the global model's on its first round). The reported model is personalised: shared
weights + the site's statistics (the server's statistics stay θ^0's, so only
``models = ("personalized",)`` is reported).
"""

from __future__ import annotations

import torch
from torch import nn

from iopfl.fl.aggregation import StateDict, merge_states
from iopfl.fl.base import ClientReply, Strategy, split_reply
from iopfl.fl.training import LocalTrainer
from iopfl.models.routing import NORM_TYPES


def norm_statistic_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every normalisation layer's buffers (running statistics, batch counter),
    found by module type; their affine parameters are not among them."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys |= {f"{name}.{k}" if name else k for k, _ in module.named_buffers(recurse=False)}
    return keys


class SiloBN(Strategy):
    name = "silobn"
    models = ("personalized",)

    def client_round(self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict,
                     generator: torch.Generator) -> ClientReply:
        result = trainer.train(merge_states(global_weights, personal), generator)
        local = norm_statistic_keys(trainer.model)
        return split_reply(result.weights, trainer.num_samples, result.loss, local.__contains__)

    def personalized_weights(self, trainer: LocalTrainer, global_weights: StateDict,
                             personal: StateDict, generator: torch.Generator) -> StateDict | None:
        return merge_states(global_weights, personal) if personal else None
