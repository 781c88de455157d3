"""In-process federated runner: every site's client in one process, rounds in sequence.

The work is split as it is on a real deployment, so the Flower apps reuse the same pieces:
:class:`SiteClient` is everything that lives at a hospital (its data, personal state and selected
personalised model); :class:`Coordinator` is everything the server holds (global weights, the
val-selected global model, the last evaluation). One round: sample clients (seeded by the round),
each runs the strategy's client half, the server half aggregates what was sent. Every ``eval_every``
rounds (and at the last) each site scores the global and its personalised model on val and test;
model selection reads val only. A checkpoint after every round makes ``--resume`` exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from iopfl.config import Config
from iopfl.data import Case, DatasetSpec, SiteData, SliceDataset, load_dataset
from iopfl.engine.checkpoint import load_checkpoint, pack, save_checkpoint, unpack
from iopfl.engine.rundir import RunDir, manifest
from iopfl.errors import UserError
from iopfl.fileio import atomic_write_text
from iopfl.fl import ClientReply, Strategy, build_strategy
from iopfl.fl.aggregation import StateDict, clone_state
from iopfl.fl.training import LocalTrainer
from iopfl.models import build_model
from iopfl.seeding import derive_generator, derive_seed

log = logging.getLogger(__name__)
SPLITS = ("val", "test")
POOLED = "pooled"
Scores = dict[str, dict[str, dict]]  # model -> split -> site summary


class Progress(Protocol):
    """What the runner reports while it works (the CLI draws it with rich)."""

    def start(self, total_rounds: int, first_round: int) -> None: ...
    def client_done(self, round_: int, site: str, loss: float) -> None: ...
    def round_done(self, round_: int, val_dice: dict[str, float]) -> None: ...


@dataclass
class Selected:
    """The val-selected model of one slot (the global model, or one site's personalised model)."""

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

    @classmethod
    def restore(cls, state: dict[str, Any], weights: StateDict) -> Selected:
        return cls(state["round"], state["val"], state["test"], weights)


def val_dice(scores: dict[str, dict]) -> float | None:
    """Mean val Dice from a site's ``{split: summary}``, or None when it has no val cases."""
    val = scores["val"]
    return float(val["dice"]) if val.get("n", 0) > 0 else None


# --- what lives at a site ----------------------------------------------------------------------

class SiteClient:
    """One hospital: training data, personal state, and its val-selected personalised model.

    ``trainer`` is None for a site that only evaluates (centralised training trains one pooled client).
    """

    def __init__(self, name: str, trainer: LocalTrainer | None, data: SiteData | None,
                 spec: DatasetSpec, build: Callable[[], torch.nn.Module], eval_batch: int):
        self.name, self.trainer, self.data, self.spec = name, trainer, data, spec
        self.build, self.eval_batch = build, eval_batch
        self.personal: StateDict = {}
        self.best = Selected()
        self._eval_model: torch.nn.Module | None = None

    def fit(self, strategy: Strategy, global_weights: StateDict, seed: int, round_: int) -> ClientReply:
        """The strategy's client half; the personal state is kept here, only the reply's weights leave."""
        gen = derive_generator(seed, "train", round_, self.name)
        reply = strategy.client_round(self.trainer, global_weights, self.personal, gen)
        self.personal = reply.personal
        return reply

    def personalized(self, strategy: Strategy, global_weights: StateDict, seed: int, round_: int) -> StateDict:
        """This site's personalised model; the global one until the strategy has made one."""
        gen = derive_generator(seed, "personalize", round_, self.name)
        personal = strategy.personalized_weights(self.trainer, global_weights, self.personal, gen)
        return global_weights if personal is None else personal

    def score(self, weights: StateDict) -> dict[str, dict]:
        """``{split: summary}`` of ``weights`` on this site's val and test cases."""
        # MONAI is imported only where scoring happens: a Flower training message never needs it
        from iopfl.evaluation.evaluate import evaluate_cases

        if self._eval_model is None:
            self._eval_model = self.build()
        self._eval_model.load_state_dict(weights)
        return {split: evaluate_cases(self._eval_model, getattr(self.data, split), self.spec, self.eval_batch)
                for split in SPLITS}

    def evaluate(self, strategy: Strategy, global_weights: StateDict, seed: int, round_: int) -> Scores:
        """Score every model the strategy reports; offer the personalised one to val selection."""
        scores = {}
        for model in strategy.models:
            if model == "global":
                scores[model] = self.score(global_weights)
                continue
            weights = self.personalized(strategy, global_weights, seed, round_)
            scores[model] = self.score(weights)
            self.best.offer(round_, val_dice(scores[model]), scores[model]["test"], weights)
        return scores

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**pack(f"personal/{self.name}", self.personal), **pack(f"best/{self.name}", self.best.weights)}

    def load_state(self, tensors: dict[str, torch.Tensor], best_state: dict[str, Any]) -> None:
        self.personal = unpack(f"personal/{self.name}", tensors)
        self.best = Selected.restore(best_state, unpack(f"best/{self.name}", tensors))


# --- what the server holds ---------------------------------------------------------------------

class Coordinator:
    """Server state: global weights, the val-selected global model, the last evaluation."""

    def __init__(self, strategy: Strategy, global_weights: StateDict, sites: list[str]):
        self.strategy, self.global_weights, self.sites = strategy, global_weights, sites
        self.best_global = Selected()
        self.last_eval: dict[str, Any] = {}
        self.round = 0

    def aggregate(self, replies: list[tuple[StateDict, int]]) -> None:
        self.global_weights = self.strategy.aggregate(self.global_weights, replies)

    def record(self, round_: int, scores: dict[str, Scores]) -> None:
        """Keep the round's per-site scores; select the global model by mean val Dice over sites."""
        self.last_eval = {"round": round_, "scores": scores}
        if "global" not in self.strategy.models:
            return
        vals = [val_dice(scores[s]["global"]) for s in self.sites]
        mean_val = None if any(v is None for v in vals) else sum(vals) / len(vals)
        tests = {s: scores[s]["global"]["test"] for s in self.sites}
        self.best_global.offer(round_, mean_val, tests, self.global_weights)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**pack("global", self.global_weights), **pack("best/global", self.best_global.weights)}

    def state(self) -> dict[str, Any]:
        return {"round": self.round, "best_global": self.best_global.state(), "last_eval": self.last_eval}

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.global_weights = unpack("global", tensors)
        self.best_global = Selected.restore(state["best_global"], unpack("best/global", tensors))
        self.last_eval = state["last_eval"]

    def results(self, personal_best: dict[str, dict[str, Any]], dataset: str, cfg: Config) -> dict[str, Any]:
        """results.json (DESIGN §5): val-selected models under ``models``, the last round under
        ``last_round``; ``personal_best`` is each site's ``Selected.state()``."""
        models = self.strategy.models
        chosen: dict[str, Any] = {}
        selection: dict[str, Any] = {}
        if "global" in models:
            chosen["global"] = model_entry(self.best_global.test)
            selection["global"] = self.best_global.round
        if "personalized" in models:
            chosen["personalized"] = model_entry({s: personal_best[s]["test"] for s in self.sites})
            selection["personalized"] = {s: personal_best[s]["round"] for s in self.sites}
        scores = self.last_eval["scores"]
        last = {m: model_entry({s: scores[s][m]["test"] for s in self.sites}) for m in models}
        return {
            "method": self.strategy.name,
            "federated": self.strategy.federated,
            "dataset": dataset,
            "seed": cfg.seed,
            "rounds": cfg.fl.rounds,
            "sites": self.sites,
            "holdout": cfg.data.holdout,
            "models": chosen,
            "last_round": {"round": self.last_eval["round"], "models": last},
            "selection": selection,
            "units": {"dice": "fraction", "hd95": "mm", "assd": "mm"},
        }


def model_entry(sites: dict[str, dict]) -> dict[str, Any]:
    from iopfl.evaluation.metrics import summarize_sites

    return {"sites": sites, "mean": summarize_sites(list(sites.values()))}


# --- set-up shared by every engine ---------------------------------------------------------------

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


def sample_clients(cfg: Config, clients: list[str], round_: int) -> list[str]:
    """The round's participants: ⌈fraction·K⌉ (at least ``min_clients``) drawn by a round-seeded RNG."""
    k = len(clients)
    m = min(k, max(cfg.fl.min_clients, math.ceil(cfg.fl.client_fraction * k - 1e-9)))
    if m == k:
        return list(clients)
    order = torch.randperm(k, generator=derive_generator(cfg.seed, "sample", round_))[:m]
    return [clients[i] for i in sorted(order.tolist())]


def make_trainer(cfg: Config, build: Callable[[], torch.nn.Module], cases: list[Case], context: int,
                 name: str) -> LocalTrainer:
    if not cases:
        raise UserError(f"site '{name}': no training cases")
    images, masks = SliceDataset(cases, context).tensors()
    return LocalTrainer(build, images, masks, cfg.train_settings())


def network_description(cfg: Config, spec: DatasetSpec) -> dict[str, Any]:
    """What a checkpoint's reader needs to rebuild the network and prepare inputs for it."""
    return {"in_channels": spec.in_channels, "num_classes": spec.num_classes, "context": spec.context,
            "regions": spec.regions, "image_size": cfg.data.image_size,
            "width": cfg.model.width, "depth": cfg.model.depth}


def is_eval_round(cfg: Config, round_: int) -> bool:
    return round_ % cfg.eval.eval_every == 0 or round_ == cfg.fl.rounds


# --- the in-process engine -----------------------------------------------------------------------

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
        self.server = Coordinator(self.strategy, initial_weights(cfg, self.build), self.sites)
        self.clients, self.fit_clients = self._make_clients()

    def _make_clients(self) -> tuple[dict[str, SiteClient], dict[str, SiteClient]]:
        """(evaluating clients by site, training clients by name) — the same objects unless pooled."""
        ctx, batch = self.spec.context, self.cfg.eval.batch_size

        def client(name: str, cases: list[Case], data: SiteData | None) -> SiteClient:
            trainer = make_trainer(self.cfg, self.build, cases, ctx, name) if cases else None
            return SiteClient(name, trainer, data, self.spec, self.build, batch)

        if self.strategy.pooled:
            pooled = [c for s in self.sites for c in self.spec.sites[s].train]
            evaluators = {s: client(s, [], self.spec.sites[s]) for s in self.sites}
            return evaluators, {POOLED: client(POOLED, pooled, None)}
        clients = {s: client(s, self.spec.sites[s].train, self.spec.sites[s]) for s in self.sites}
        return clients, clients

    @property
    def round(self) -> int:
        return self.server.round

    def run(self, resume: bool = False) -> dict[str, Any]:
        self._open(resume)
        total = self.cfg.fl.rounds
        if self.progress:
            self.progress.start(total, self.round + 1)
        while self.server.round < total:
            self.server.round += 1
            self._train_round(self.server.round)
            if is_eval_round(self.cfg, self.server.round):
                self._evaluate_round(self.server.round)
            self._save_checkpoint()
        results = self.results()
        self.dir.write_json("results.json", results)
        return results

    def _train_round(self, round_: int) -> None:
        replies = []
        for name in sample_clients(self.cfg, list(self.fit_clients), round_):
            reply = self.fit_clients[name].fit(self.strategy, self.server.global_weights, self.cfg.seed, round_)
            replies.append((reply.weights, reply.num_samples))
            loss = float(reply.metrics.get("loss", float("nan")))
            self.dir.append_metrics([{"round": round_, "model": "local", "split": "train", "site": name,
                                      "loss": loss}])
            if self.progress:
                self.progress.client_done(round_, name, loss)
        self.server.aggregate(replies)

    def _evaluate_round(self, round_: int) -> None:
        scores = {s: self.clients[s].evaluate(self.strategy, self.server.global_weights, self.cfg.seed, round_)
                  for s in self.sites}
        self.server.record(round_, scores)
        self.dir.append_metrics(metric_lines(round_, scores))
        if self.progress:
            self.progress.round_done(round_, val_dice_by_site(scores))

    # --- checkpoint and resume --------------------------------------------------------------------
    def _all_clients(self) -> dict[str, SiteClient]:
        return {**self.clients, **self.fit_clients}

    def _save_checkpoint(self) -> None:
        tensors = self.server.state_tensors()
        for c in self._all_clients().values():
            tensors.update(c.state_tensors())
        tensors["rng/torch"] = torch.get_rng_state()
        state = {"format": 1, "config_hash": self.cfg.digest(), "method": self.strategy.name,
                 "sites": self.sites, "network": network_description(self.cfg, self.spec),
                 "server": self.server.state(),
                 "clients": {name: c.best.state() for name, c in self._all_clients().items()}}
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
        atomic_write_text(self.dir.path / "config.yaml", self.cfg.to_yaml())
        self.dir.write_json("manifest.json", manifest(self.cfg.seed, self.cfg.digest()))
        self.dir.metrics.unlink(missing_ok=True)

    def _restore(self) -> None:
        tensors, state = load_checkpoint(self.dir.checkpoint)
        if state.get("config_hash") != self.cfg.digest():
            raise UserError(f"{self.dir.checkpoint}: written with a different config; "
                            "resume with the run's own config.yaml")
        self.server.load_state(tensors, state["server"])
        for name, c in self._all_clients().items():
            c.load_state(tensors, state["clients"][name])
        torch.set_rng_state(tensors["rng/torch"])
        self.dir.trim_metrics(self.round)
        log.info("resumed %s at round %d", self.dir.path, self.round)

    # --- results ----------------------------------------------------------------------------------
    def selected_weights(self, model: str, site: str) -> StateDict:
        """The val-selected weights of ``model`` ("global" or "personalized") for ``site``."""
        return self.server.best_global.weights if model == "global" else self.clients[site].best.weights

    def results(self) -> dict[str, Any]:
        personal_best = {s: self.clients[s].best.state() for s in self.sites}
        return self.server.results(personal_best, self.spec.name, self.cfg)


def metric_lines(round_: int, scores: dict[str, Scores]) -> list[dict]:
    """metrics.jsonl lines of one evaluation: one per (model, split, site)."""
    keys = ("dice", "hd95", "assd", "ref_dice", "n")
    return [{"round": round_, "model": model, "split": split, "site": site,
             **{k: summary[k] for k in keys if k in summary}}
            for site, by_model in scores.items() for model, by_split in by_model.items()
            for split, summary in by_split.items()]


def val_dice_by_site(scores: dict[str, Scores]) -> dict[str, float]:
    """Val Dice per site of the personalised model (the global one for strategies without it)."""
    out = {}
    for site, by_model in scores.items():
        model = "personalized" if "personalized" in by_model else "global"
        value = val_dice(by_model[model])
        out[site] = float("nan") if value is None else value
    return out
