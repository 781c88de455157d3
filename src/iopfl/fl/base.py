"""The strategy interface every federated method implements.

A strategy is split along the wire: ``client_round`` runs where the data is and returns what is *sent*
(``ClientReply.weights``, ``num_samples``, ``metrics``) apart from what is *kept* (``personal``);
``aggregate`` runs on the server and sees only what was sent. Engines (in-process or Flower) call the
two halves and store the personal state on the client side, so personal weights never travel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from iopfl.fl.aggregation import StateDict, clone_state, merge_states, weighted_average
from iopfl.fl.training import LocalTrainer
from iopfl.results import GLOBAL, PERSONALIZED


class StrategyParams(BaseModel):
    """A strategy's own hyper-parameters: each strategy declares a subclass next to its rule, and the
    config accepts exactly its fields as ``fl.<field>`` keys when that strategy is ``fl.method``."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ClientReply:
    """One client's answer to a round.

    ``weights``, ``num_samples`` and ``metrics`` are sent to the server; ``personal`` stays on the
    client (the engine stores it locally and passes it back next round).
    """

    weights: StateDict
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    personal: StateDict = field(default_factory=dict)


def split_reply(weights: StateDict, num_samples: int, loss: float, keep: Callable[[str], bool]) -> ClientReply:
    """A reply that sends every key of ``weights`` except those ``keep`` names, which stay as personal
    state (the split of FedBN, SiloBN, FedRep and FedPer)."""
    sent = {k: v for k, v in weights.items() if not keep(k)}
    kept = {k: v for k, v in weights.items() if keep(k)}
    return ClientReply(sent, num_samples, {"loss": loss}, kept)


class Strategy:
    """Base class: FedAvg's behaviour (McMahan et al., AISTATS 2017).

    Client: θ_k ← local training from θ. Server: θ ← Σ_k n_k θ_k / Σ_k n_k.
    Subclasses override the client half, the server half, or the personalised model.
    """

    name: ClassVar[str] = ""
    #: False for baselines that are not federated learning (e.g. centralised training).
    federated: ClassVar[bool] = True
    #: True when one client trains on every site's pooled data (centralised training).
    pooled: ClassVar[bool] = False
    #: Model names this strategy reports (GLOBAL, PERSONALIZED).
    models: ClassVar[tuple[str, ...]] = (GLOBAL,)
    #: The ``fl.`` keys this strategy reads (none by default).
    Params: ClassVar[type[StrategyParams]] = StrategyParams

    def __init__(self, params: StrategyParams | Mapping[str, Any] | None = None):
        self.params = params if isinstance(params, StrategyParams) else self.Params(**(params or {}))

    def client_round(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> ClientReply:
        """Train from the global weights and send the result; no personal state by default."""
        result = trainer.train(global_weights, generator)
        return ClientReply(result.weights, trainer.num_samples, {"loss": result.loss})

    def aggregate(self, global_weights: StateDict, replies: list[tuple[StateDict, int]]) -> StateDict:
        """Sample-weighted mean of the sent keys; keys nobody sent keep their global value."""
        if not replies:
            return clone_state(global_weights)
        merged = clone_state(global_weights)
        merged.update(weighted_average([w for w, _ in replies], [n for _, n in replies]))
        return merged

    def personalized_weights(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> StateDict | None:
        """The client's personalised model, or None when the strategy has none."""
        return None


class PartlyLocal(Strategy):
    """Base of the strategies that keep part of the network at the site (FedBN, SiloBN, FedRep, FedPer).

    Client: train from θ^{t-1} with the site's kept part substituted (the global model's on its first
    round), send every other key, keep the keys :meth:`kept` names. Personalised model = the global
    weights + the site's kept part; the server's copy of the kept part stays θ^0's, so only
    ``"personalized"`` is reported.
    """

    models = (PERSONALIZED,)

    def kept(self, model: torch.nn.Module) -> Callable[[str], bool]:
        """Which state-dict keys of ``model`` stay at the site."""
        raise NotImplementedError

    def client_round(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> ClientReply:
        result = trainer.train(merge_states(global_weights, personal), generator)
        return split_reply(result.weights, trainer.num_samples, result.loss, self.kept(trainer.model))

    def personalized_weights(
        self, trainer: LocalTrainer, global_weights: StateDict, personal: StateDict, generator: torch.Generator
    ) -> StateDict | None:
        return merge_states(global_weights, personal) if personal else None
