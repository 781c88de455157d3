"""FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", arXiv 1912.00818, 2019).

The network is split into shared base layers and local personalization layers (the head; for our
U-Net the last decoder block and the output convolution, as FedRep's). Each round client k trains
the whole network jointly — body and its own head together, ``fl.local_epochs`` — from θ^{t-1} with
its head substituted (the global model's on its first round), sends the body and keeps the head.
Server: FedAvg over the body. Unlike FedRep there is one training phase, not head-then-body.
Personalised model = global body + the site's head (only ``models = ("personalized",)`` is reported).
"""

from __future__ import annotations

from iopfl.fl.base import PartlyLocal
from iopfl.fl.fedrep import FedRep


class FedPer(PartlyLocal):
    name = "fedper"

    kept = FedRep.kept  # the same head; trained with the body in one phase (PartlyLocal.client_round)
