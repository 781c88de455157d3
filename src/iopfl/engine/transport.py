"""What the federation core (:mod:`iopfl.engine.federation`) asks of a transport, and what a transport
answers: the in-process sites (:mod:`iopfl.engine.inprocess`), the worker processes
(:mod:`iopfl.engine.workers`) and the Flower grid (:mod:`iopfl.engine.flower.server`) each implement
:class:`Sites`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from iopfl.engine.site import Scores
from iopfl.fl import ClientReply, Strategy
from iopfl.models import StateDict


@dataclass
class Roster:
    """Who takes part: the inside sites (evaluated, in order), the names that train (the sites, or one
    pooled client for centralised training), the network their data needs, and where each site
    computes (device, precision, versions: recorded in the manifest)."""

    sites: list[str]
    trainers: list[str]
    network: dict[str, Any]
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class EvalReply:
    """A site's evaluation: its scores (model → split → summary) and the summary of its val-selected
    personalised model (the model itself stays at the site)."""

    scores: Scores
    best: dict[str, Any]


Reply = ClientReply | str  # a site's result, or why it has none this time


class Sites(Protocol):
    """The transport: how the federation reaches its sites. ``strategy`` is the run's strategy (its
    server half aggregates in the core; in this process the sites run its client half)."""

    engine: str
    strategy: Strategy

    def connect(self, run_key: str, known_sites: list[str] | None) -> Roster: ...
    def fit(self, round_: int, names: list[str], weights: StateDict) -> Iterator[tuple[str, Reply]]: ...
    def evaluate(self, round_: int, sites: list[str], weights: StateDict) -> dict[str, EvalReply | str]: ...
    def publish(self, selected_global: StateDict, overlay_sites: list[str]) -> dict[str, StateDict | None]: ...
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...
    def load_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class Progress(Protocol):
    """What the core reports while it works (the CLI draws it with rich)."""

    def start(self, total_rounds: int, first_round: int, trainers_per_round: int) -> None: ...
    def client_done(self, round_: int, site: str, loss: float) -> None: ...
    def round_done(self, round_: int, val_dice: dict[str, float]) -> None: ...
