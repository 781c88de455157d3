"""The in-process engine: every site's client in this process, called directly — a simulation of a
federation on one machine (`iopfl train`). The round loop, selection and the run directory are the
federation core's (:mod:`iopfl.engine.federation`); this module is only the transport."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from iopfl.config import Config
from iopfl.data import load_dataset
from iopfl.engine.site import SiteClient, SiteFailure, make_client, network_description, training_sites
from iopfl.engine.transport import EvalReply, Reply, Roster
from iopfl.fl import build_strategy
from iopfl.models import StateDict
from iopfl.results import GLOBAL, PERSONALIZED
from iopfl.runtime import Runtime

POOLED = "pooled"


class InProcessSites:
    """The sites as objects in this process; their personal state goes into the run's checkpoint.

    ``runtime``: where they compute (resolved and applied by the entry point); ``overlay_dir``: where
    the sites draw their overlays (the run's plots: their images are here).
    """

    engine = "inprocess"

    def __init__(self, cfg: Config, runtime: Runtime, overlay_dir: Path):
        self.cfg, self.runtime, self.overlay_dir = cfg, runtime, overlay_dir
        self.strategy = build_strategy(cfg.fl.method, cfg.fl.strategy_params())
        self.clients: dict[str, SiteClient] = {}  # the evaluated sites
        self.trainers: dict[str, SiteClient] = {}  # who trains: the same objects unless pooled

    def connect(self, run_key: str, known_sites: list[str] | None) -> Roster:
        cfg, runtime = self.cfg, self.runtime
        spec = load_dataset(cfg.data)
        sites = training_sites(cfg, spec)
        if self.strategy.pooled:
            pooled = [c for s in sites for c in spec.sites[s].train]
            self.clients = {s: make_client(cfg, runtime, spec, s, spec.sites[s], None) for s in sites}
            self.trainers = {POOLED: make_client(cfg, runtime, spec, POOLED, None, pooled)}
        else:
            self.clients = {s: make_client(cfg, runtime, spec, s, spec.sites[s], spec.sites[s].train) for s in sites}
            self.trainers = self.clients
        return Roster(
            sites, list(self.trainers), network_description(cfg, spec), dict.fromkeys(sites, runtime.describe())
        )

    def fit(self, round_: int, names: list[str], weights: StateDict) -> Iterator[tuple[str, Reply]]:
        for name in names:
            try:
                yield name, self.trainers[name].fit(self.strategy, weights, self.cfg.seed, round_)
            except SiteFailure as exc:
                yield name, str(exc)

    def evaluate(self, round_: int, sites: list[str], weights: StateDict) -> dict[str, EvalReply | str]:
        out: dict[str, EvalReply | str] = {}
        for site in sites:
            client = self.clients[site]
            scores = client.evaluate(self.strategy, weights, self.cfg.seed, round_)
            out[site] = EvalReply(scores, client.best.state())
        return out

    def publish(self, selected_global: StateDict, overlay_sites: list[str]) -> dict[str, StateDict | None]:
        """Every site publishes when ``fl.publish_personal`` (a simulation: the sites are ours)."""
        label = PERSONALIZED if PERSONALIZED in self.strategy.models else GLOBAL
        for site in overlay_sites:
            client = self.clients[site]
            client.draw_overlay(client.selected(self.strategy, selected_global), self.overlay_dir, label)
        opted = self.cfg.fl.publish_personal and PERSONALIZED in self.strategy.models
        return {s: (c.best.weights if opted and c.best.weights else None) for s, c in self.clients.items()}

    def _all(self) -> dict[str, SiteClient]:
        return {**self.clients, **self.trainers}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for client in self._all().values():
            tensors.update(client.state_tensors())
        return tensors, {name: c.best.state() for name, c in self._all().items()}

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        for name, client in self._all().items():
            client.load_state(tensors, state[name])

    def close(self) -> None:
        pass
