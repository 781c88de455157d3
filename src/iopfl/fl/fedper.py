"""FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", arXiv 1912.00818, 2019).

The network is split into shared base layers and local personalization layers (the head; for our
U-Net the last decoder block and the output convolution, as FedRep's). Each round client k trains
the whole network jointly — body and its own head together, ``fl.local_epochs`` — from θ^{t-1} with
its head substituted (the global model's on its first round), sends the body and keeps the head.
Server: FedAvg over the body. Unlike FedRep there is one training phase, not head-then-body.
Personalised model = global body + the site's head (only ``models = ("personalized",)`` is reported).
"""

from __future__ import annotations

import torch

from iopfl.fl.aggregation import StateDict, merge_states
from iopfl.fl.base import ClientReply, Strategy, split_reply
from iopfl.fl.fedrep import head_prefixes
from iopfl.fl.training import LocalTrainer


class FedPer(Strategy):
    name = "fedper"
    models = ("personalized",)

    def client_round(self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict,
                     generator: torch.Generator) -> ClientReply:
        prefixes = head_prefixes(trainer.model)
        result = trainer.train(merge_states(global_weights, personal), generator)
        return split_reply(result.weights, trainer.num_samples, result.loss, lambda k: k.startswith(prefixes))

    def personalized_weights(self, trainer: LocalTrainer, global_weights: StateDict,
                             personal: StateDict, generator: torch.Generator) -> StateDict | None:
        return merge_states(global_weights, personal) if personal else None
