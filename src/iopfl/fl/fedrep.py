"""FedRep (Collins et al., "Exploiting Shared Representations for Personalized Federated Learning",
ICML 2021).

The network is split into a shared body and a local head; for our U-Net the head is the last decoder
block and the output convolution. Each round client k first trains its head with the body frozen,
then the body with the head frozen (``fl.local_epochs`` each), sends only the body and keeps the head.
Server: FedAvg over the body. Personalised model = global body + the site's head (the server's model
keeps θ^0's head, so only ``models = ("personalized",)`` is reported).

Choices: both phases use ``fl.local_epochs`` (the paper runs many more head than body updates), so a
FedRep round costs two local epochs. "Frozen" means no gradient step: the network is in training mode
in both phases, so the body's BatchNorm running statistics also move during the head phase (as in
the authors' code).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from iopfl.fl.aggregation import StateDict, merge_states
from iopfl.fl.base import ClientReply, PartlyLocal, split_reply
from iopfl.fl.training import LocalTrainer


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module prefixes of the local head: the U-Net's last decoder block and output convolution;
    for other networks, their last top-level child that has parameters."""
    decoders = getattr(model, "decoders", None)
    if isinstance(decoders, nn.ModuleList) and hasattr(model, "head"):
        return (f"decoders.{len(decoders) - 1}.", "head.")
    last = [name for name, child in model.named_children() if any(True for _ in child.parameters())][-1]
    return (f"{last}.",)


class FedRep(PartlyLocal):
    name = "fedrep"

    def kept(self, model: nn.Module) -> Callable[[str], bool]:
        prefixes = head_prefixes(model)
        return lambda key: key.startswith(prefixes)

    def client_round(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> ClientReply:
        in_head = self.kept(trainer.model)
        head_phase = trainer.train(merge_states(global_weights, personal), generator, trainable=in_head)
        body_phase = trainer.train(head_phase.weights, generator, trainable=lambda k: not in_head(k))
        return split_reply(body_phase.weights, trainer.num_samples, body_phase.loss, in_head)
