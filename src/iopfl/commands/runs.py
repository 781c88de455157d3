"""A finished run directory as ``adapt`` and ``predict`` read it: its config, its val-selected global
model and the personalised models its sites published."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iopfl.config import Config, load_config
from iopfl.engine.checkpoint import load_checkpoint, read_run_checkpoint, unpack
from iopfl.engine.rundir import RunDir
from iopfl.errors import UserError
from iopfl.models import StateDict, network_builder
from iopfl.results import GLOBAL, read_run_results


@dataclass
class TrainedRun:
    """What ``adapt`` and ``predict`` need from a run directory."""

    path: Path
    cfg: Config
    network: dict[str, Any]  # in_channels, num_classes, context, regions, image_size, width, depth
    sites: list[str]  # the inside sites
    run_key: str
    global_weights: StateDict  # val-selected θ*
    personal: dict[str, StateDict]  # the published val-selected φ_k*, by site (in site order)

    def build(self) -> Callable[[], torch.nn.Module]:
        return network_builder(self.network)

    def experts(self) -> list[StateDict]:
        """[θ*, then every published φ_k*]."""
        return [self.global_weights, *self.personal.values()]

    def expert_names(self) -> list[str]:
        return [GLOBAL, *self.personal]


OPT_IN = (
    "on a Flower deployment a site publishes its model only with node config publish-personal='true'; "
    "in-process with fl.publish_personal=true"
)


def open_run(path: Path) -> TrainedRun:
    """Config, val-selected global weights and published experts of a run; clear errors for anything missing."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise UserError(f"{path}: run directory not found")
    cfg = load_config(run.path / "config.yaml")
    if not run.checkpoint.exists():
        raise UserError(f"{run.checkpoint}: no checkpoint (the run has not finished a round)")
    tensors, state = read_run_checkpoint(run.checkpoint)
    published = read_run_results(run.results).published if run.results.exists() else []
    personal = {}
    for site in (s for s in state["sites"] if s in published):
        personal[site], _ = load_checkpoint(run.expert(site))
    best_global = unpack(f"best/{GLOBAL}", tensors) or unpack(GLOBAL, tensors)
    return TrainedRun(run.path, cfg, state["network"], list(state["sites"]), state["run_key"], best_global, personal)
