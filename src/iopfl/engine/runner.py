"""In-process federated runner: every site's client in one process, rounds in sequence.

One round: sample clients (seeded by the round), each runs the strategy's client half on its own
data and keeps its personal state, the server half aggregates what was sent. Every ``eval_every``
rounds (and at the last) the global and personalised models are scored on each site's val and test
split; model selection reads val only. A checkpoint after every round makes ``--resume`` exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from iopfl.config import Config
from iopfl.data import DatasetSpec, SliceDataset, load_dataset
from iopfl.engine.checkpoint import load_checkpoint, pack, save_checkpoint, unpack
from iopfl.engine.rundir import RunDir, manifest
from iopfl.errors import UserError
from iopfl.evaluation.evaluate import evaluate_cases
from iopfl.evaluation.metrics import summarize_sites
from iopfl.fl import Strategy, build_strategy
from iopfl.fl.aggregation import StateDict, clone_state
from iopfl.fl.training import LocalTrainer
from iopfl.models import build_model
from iopfl.seeding import derive_generator, derive_seed

log = logging.getLogger(__name__)
SPLITS = ("val", "test")


class Progress(Protocol):
    """What the runner reports while it works (the CLI draws it with rich)."""

    def start(self, total_rounds: int, first_round: int) -> None: ...
    def client_done(self, round_: int, site: str, loss: float) -> None: ...
    def round_done(self, round_: int, val_dice: dict[str, float]) -> None: ...


@dataclass
class Selected:
    """The val-selected model of one slot (global, or one site's personalised model)."""

    round: int = 0
    val: float = float("-inf")
    test: dict[str, Any] = field(default_factory=dict)
    weights: StateDict = field(default_factory=dict)

    def offer(self, round_: int, val: float | None, test: dict[str, Any], weights: StateDict) -> None:
        """Keep this round if its val score is strictly better (no val split: keep the latest)."""
        if val is None or val > self.val:
            self.round, self.val, self.test = round_, (self.val if val is None else val), test
            self.weights = clone_state(weights)

    def state(self) -> dict[str, Any]:
        return {"round": self.round, "val": self.val, "test": self.test}


def build_network(cfg: Config, spec: DatasetSpec) -> Callable[[], torch.nn.Module]:
    """A factory for the configured U-Net on this dataset's channels and classes."""
    return lambda: build_model(spec.in_channels, spec.num_classes, cfg.model.width, cfg.model.depth)


def initial_weights(cfg: Config, build: Callable[[], torch.nn.Module]) -> StateDict:
    """θ^0: the same for every engine given the seed."""
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    return clone_state(build().state_dict())


def training_sites(cfg: Config, spec: DatasetSpec) -> list[str]:
    """The inside sites: every site but the held-out one."""
    if cfg.data.holdout is not None and cfg.data.holdout not in spec.sites:
        raise UserError(f"data.holdout: unknown site '{cfg.data.holdout}' (sites: {', '.join(spec.sites)})")
    sites = [s for s in spec.sites if s != cfg.data.holdout]
    if not sites:
        raise UserError("data.sites: no site left to train on")
    return sites


def sample_clients(cfg: Config, sites: list[str], round_: int) -> list[str]:
    """The round's participants: ⌈fraction·K⌉ (at least ``min_clients``) drawn by a round-seeded RNG."""
    k = len(sites)
    m = min(k, max(cfg.fl.min_clients, round(cfg.fl.client_fraction * k)))
    if m == k:
        return list(sites)
    order = torch.randperm(k, generator=derive_generator(cfg.seed, "sample", round_))[:m]
    return [sites[i] for i in sorted(order.tolist())]


class FederatedRun:
    """One federated training run over the sites of ``cfg.data``, writing into ``run_dir``."""

    def __init__(self, cfg: Config, run_dir: Path, progress: Progress | None = None):
        self.cfg = cfg
        self.dir = RunDir(run_dir)
        self.progress = progress
        self.strategy: Strategy = build_strategy(cfg.fl.method, cfg.fl.strategy_config())
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.spec = load_dataset(cfg.data)
        self.sites = training_sites(cfg, self.spec)
        self.build = build_network(cfg, self.spec)
        self.trainers = {s: self._trainer(s) for s in self.sites}
        self.eval_model = self.build()
        self.global_weights = initial_weights(cfg, self.build)
        self.personal: dict[str, StateDict] = {s: {} for s in self.sites}
        self.selected: dict[str, dict[str, Selected]] = {
            m: ({"*": Selected()} if m == "global" else {s: Selected() for s in self.sites})
            for m in self.strategy.models
        }
        self.last_eval: dict[str, Any] = {}
        self.round = 0

    def _trainer(self, site: str) -> LocalTrainer:
        cases = self.spec.sites[site].train
        if not cases:
            raise UserError(f"site '{site}': no training cases")
        images, masks = SliceDataset(cases, self.spec.context).tensors()
        return LocalTrainer(self.build, images, masks, self.cfg.train_settings())

    # --- the loop -------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        self._open(resume)
        total = self.cfg.fl.rounds
        if self.progress:
            self.progress.start(total, self.round + 1)
        while self.round < total:
            self.round += 1
            self._train_round(self.round)
            if self.round % self.cfg.eval.eval_every == 0 or self.round == total:
                self._evaluate_round(self.round)
            self._save_checkpoint()
        results = self.results()
        self.dir.write_json("results.json", results)
        return results

    def _train_round(self, round_: int) -> None:
        replies = []
        for site in sample_clients(self.cfg, self.sites, round_):
            gen = derive_generator(self.cfg.seed, "train", round_, site)
            reply = self.strategy.client_round(self.trainers[site], self.global_weights, self.personal[site], gen)
            self.personal[site] = reply.personal
            replies.append((reply.weights, reply.num_samples))
            loss = float(reply.metrics.get("loss", float("nan")))
            self.dir.append_metrics([{"round": round_, "model": "local", "split": "train", "site": site,
                                      "loss": loss}])
            if self.progress:
                self.progress.client_done(round_, site, loss)
        self.global_weights = self.strategy.aggregate(self.global_weights, replies)

    # --- evaluation and selection ----------------------------------------------------------------
    def model_weights(self, model: str, site: str, round_: int) -> StateDict:
        """Weights scored as ``model`` at ``site``: a site without a personalised model yet uses θ."""
        if model == "global":
            return self.global_weights
        gen = derive_generator(self.cfg.seed, "personalize", round_, site)
        personal = self.strategy.personalized_weights(self.trainers[site], self.global_weights,
                                                      self.personal[site], gen)
        return self.global_weights if personal is None else personal

    def _score(self, weights: StateDict, site: str) -> dict[str, dict]:
        self.eval_model.load_state_dict(weights)
        data = self.spec.sites[site]
        return {split: evaluate_cases(self.eval_model, getattr(data, split), self.spec,
                                      self.cfg.eval.batch_size) for split in SPLITS}

    def _evaluate_round(self, round_: int) -> None:
        scores: dict[str, dict[str, dict]] = {}
        lines = []
        for model in self.strategy.models:
            scores[model] = {}
            for site in self.sites:
                weights = self.model_weights(model, site, round_)
                scores[model][site] = self._score(weights, site)
                if model != "global":
                    self.selected[model][site].offer(round_, _val(scores[model][site]),
                                                     scores[model][site]["test"], weights)
                lines += [{"round": round_, "model": model, "split": split, "site": site,
                           **_flat(scores[model][site][split])} for split in SPLITS]
        if "global" in scores:
            vals = [_val(scores["global"][s]) for s in self.sites]
            mean_val = None if any(v is None for v in vals) else sum(vals) / len(vals)
            self.selected["global"]["*"].offer(
                round_, mean_val, {s: scores["global"][s]["test"] for s in self.sites}, self.global_weights)
        self.last_eval = {"round": round_, "scores": scores}
        self.dir.append_metrics(lines)
        if self.progress:
            self.progress.round_done(round_, _val_dice_by_site(scores))

    # --- checkpoint and resume --------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        tensors = pack("global", self.global_weights)
        for site, personal in self.personal.items():
            tensors.update(pack(f"personal/{site}", personal))
        for model, slots in self.selected.items():
            for slot, sel in slots.items():
                tensors.update(pack(f"best/{model}/{slot}", sel.weights))
        tensors["rng/torch"] = torch.get_rng_state()
        state = {
            "format": 1,
            "round": self.round,
            "config_hash": self.cfg.digest(),
            "method": self.strategy.name,
            "sites": self.sites,
            "selected": {m: {slot: sel.state() for slot, sel in slots.items()}
                         for m, slots in self.selected.items()},
            "last_eval": self.last_eval,
        }
        save_checkpoint(self.dir.checkpoint, tensors, state)

    def _open(self, resume: bool) -> None:
        has_checkpoint = self.dir.checkpoint.exists()
        if has_checkpoint and not resume:
            raise UserError(f"{self.dir.path}: already holds a run; pass --resume to continue it "
                            "or choose another --out")
        self.dir.create()
        if resume and has_checkpoint:
            self._restore()
            return
        (self.dir.path / "config.yaml").write_text(self.cfg.to_yaml())
        self.dir.write_json("manifest.json", manifest(self.cfg.seed, self.cfg.digest()))
        self.dir.metrics.unlink(missing_ok=True)

    def _restore(self) -> None:
        tensors, state = load_checkpoint(self.dir.checkpoint)
        if state.get("config_hash") != self.cfg.digest():
            raise UserError(f"{self.dir.checkpoint}: written with a different config; "
                            "resume with the run's own config.yaml")
        self.round = int(state["round"])
        self.global_weights = unpack("global", tensors)
        self.personal = {s: unpack(f"personal/{s}", tensors) for s in self.sites}
        for model, slots in state["selected"].items():
            for slot, saved in slots.items():
                self.selected[model][slot] = Selected(saved["round"], saved["val"], saved["test"],
                                                      unpack(f"best/{model}/{slot}", tensors))
        self.last_eval = state["last_eval"]
        torch.set_rng_state(tensors["rng/torch"])
        self.dir.trim_metrics(self.round)
        log.info("resumed %s at round %d", self.dir.path, self.round)

    # --- results ----------------------------------------------------------------------------------
    def selected_weights(self, model: str, site: str) -> StateDict:
        slot = "*" if model == "global" else site
        return self.selected[model][slot].weights

    def results(self) -> dict[str, Any]:
        """results.json: val-selected models under ``models``, the last round under ``last_round``."""
        chosen: dict[str, dict] = {}
        for model, slots in self.selected.items():
            sites = slots["*"].test if model == "global" else {s: slots[s].test for s in self.sites}
            chosen[model] = _model_entry(sites)
        last_scores = self.last_eval["scores"]
        last = {m: _model_entry({s: last_scores[m][s]["test"] for s in self.sites}) for m in last_scores}
        return {
            "method": self.strategy.name,
            "federated": self.strategy.federated,
            "dataset": self.spec.name,
            "seed": self.cfg.seed,
            "rounds": self.cfg.fl.rounds,
            "sites": self.sites,
            "holdout": self.cfg.data.holdout,
            "models": chosen,
            "last_round": {"round": self.last_eval["round"], "models": last},
            "selection": {m: (slots["*"].round if m == "global" else {s: slots[s].round for s in self.sites})
                          for m, slots in self.selected.items()},
            "units": {"dice": "fraction", "hd95": "mm", "assd": "mm"},
        }


def _val(site_scores: dict[str, dict]) -> float | None:
    """Mean val Dice of one site, or None when the site has no val cases."""
    val = site_scores["val"]
    return float(val["dice"]) if val.get("n", 0) > 0 else None


def _flat(summary: dict) -> dict:
    return {k: summary[k] for k in ("dice", "hd95", "assd", "ref_dice", "n") if k in summary}


def _val_dice_by_site(scores: dict[str, dict[str, dict]]) -> dict[str, float]:
    model = "personalized" if "personalized" in scores else next(iter(scores))
    return {s: float(v["val"].get("dice", float("nan"))) for s, v in scores[model].items()}


def _model_entry(sites: dict[str, dict]) -> dict[str, Any]:
    return {"sites": sites, "mean": summarize_sites(list(sites.values()))}
