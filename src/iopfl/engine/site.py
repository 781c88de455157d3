"""What lives at a site (a hospital): its data, its local trainer, its personal state and its
val-selected personalised model.

Both engines serve a site with :class:`SiteClient`: the in-process engine calls it directly, the Flower
ClientApp once per message. Nothing here knows how the site is reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from iopfl.config import Config
from iopfl.data import Case, DatasetSpec, SiteData, SliceDataset
from iopfl.engine.checkpoint import pack, unpack
from iopfl.errors import UserError
from iopfl.fl import ClientReply, Strategy
from iopfl.fl.aggregation import clone_state
from iopfl.fl.training import LocalTrainer
from iopfl.models import StateDict, network_builder
from iopfl.results import GLOBAL, PERSONALIZED
from iopfl.runtime import Runtime
from iopfl.seeding import derive_generator

SPLITS = ("val", "test")
Scores = dict[str, dict[str, dict]]  # model -> split -> site summary


class SiteFailure(RuntimeError):
    """A site cannot take part in this round (e.g. its local loss turned non-finite): it reports an
    error instead of weights, and the coordinator leaves it out of the round."""


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


class SiteClient:
    """One hospital: training data, personal state, and its val-selected personalised model.

    ``trainer`` is None for a site that only evaluates (centralised training trains one pooled client).
    """

    def __init__(
        self,
        name: str,
        trainer: LocalTrainer | None,
        data: SiteData | None,
        spec: DatasetSpec,
        build: Callable[[], torch.nn.Module],
        eval_batch: int,
        device: torch.device = torch.device("cpu"),
    ):
        self.name, self.trainer, self.data, self.spec = name, trainer, data, spec
        self.build, self.eval_batch, self.device = build, eval_batch, device
        self.personal: StateDict = {}
        self.best = Selected()
        self._eval_model: torch.nn.Module | None = None

    def fit(self, strategy: Strategy, global_weights: StateDict, seed: int, round_: int) -> ClientReply:
        """The strategy's client half; the personal state is kept here, only the reply's weights leave."""
        assert self.trainer is not None, f"site {self.name} only evaluates"  # only trainers are asked to fit
        gen = derive_generator(seed, "train", round_, self.name)
        self.trainer.set_round(round_)
        reply = strategy.client_round(self.trainer, global_weights, self.personal, gen)
        loss = float(reply.metrics.get("loss", 0.0))
        if not math.isfinite(loss):
            raise SiteFailure(f"site {self.name}: local loss is {loss} in round {round_}; no weights sent")
        self.personal = reply.personal
        return reply

    def personalized(self, strategy: Strategy, global_weights: StateDict, seed: int, round_: int) -> StateDict:
        """This site's personalised model; the global one until the strategy has made one."""
        # a site without a trainer serves pooled training, which reports the global model alone
        assert self.trainer is not None, f"site {self.name} only evaluates: it has no personalised model"
        gen = derive_generator(seed, "personalize", round_, self.name)
        self.trainer.set_round(round_)  # fine-tuning strategies train here, at this round's learning rate
        personal = strategy.personalized_weights(self.trainer, global_weights, self.personal, gen)
        return global_weights if personal is None else personal

    def _model(self, weights: StateDict) -> torch.nn.Module:
        if self._eval_model is None:
            self._eval_model = self.build().to(self.device)
        self._eval_model.load_state_dict(weights)
        return self._eval_model

    def score(self, weights: StateDict) -> dict[str, dict]:
        """``{split: summary}`` of ``weights`` on this site's val and test cases."""
        # MONAI is imported only where scoring happens: a Flower training message never needs it
        from iopfl.evaluation.evaluate import evaluate_cases

        model = self._model(weights)
        return {split: evaluate_cases(model, getattr(self.data, split), self.spec, self.eval_batch) for split in SPLITS}

    def evaluate(self, strategy: Strategy, global_weights: StateDict, seed: int, round_: int) -> Scores:
        """Score every model the strategy reports; offer the personalised one to val selection."""
        scores = {}
        for model in strategy.models:
            if model == GLOBAL:
                scores[model] = self.score(global_weights)
                continue
            weights = self.personalized(strategy, global_weights, seed, round_)
            scores[model] = self.score(weights)
            self.best.offer(round_, val_dice(scores[model]), scores[model]["test"], weights)
        return scores

    def selected(self, strategy: Strategy, selected_global: StateDict) -> StateDict:
        """The model this site reports: its val-selected personalised one, else the selected global one."""
        return self.best.weights if PERSONALIZED in strategy.models else selected_global

    def draw_overlay(self, weights: StateDict, out_dir: Path, label: str) -> Path | None:
        """Middle-slice overlay of this site's first test case predicted by ``weights``, with the case's
        Dice (None: no test case). It is drawn where the site's images are: on a deployment, on the
        site's own machine."""
        from iopfl.data import case_inputs
        from iopfl.evaluation.evaluate import channel_argmax, labels_on_original_grid, predict_probs, score_case
        from iopfl.report.figures import save_figure
        from iopfl.report.run_report import overlay_figure

        if not self.data or not self.data.test:
            return None
        case = self.data.test[0]
        labels = case.labels()  # a site's test cases are labelled: they are scored
        probs = predict_probs(self._model(weights), case_inputs(case, self.spec.context), self.eval_batch)
        pred = channel_argmax(probs).numpy()  # the training grid, which the image is drawn on
        scores = score_case(labels_on_original_grid(probs, case), case, self.spec.regions)["regions"]
        slices = len(labels)
        mid = slices // 2
        where = f", slice {mid + 1}/{slices}" if slices > 1 else ""
        path = Path(out_dir) / f"{self.name}_{case.case_id.replace('/', '__')}.png"
        figure = overlay_figure(
            case.image[mid].mean(axis=0),
            labels[mid],
            pred[mid],
            f"{self.name} · {case.case_id}{where}",
            label,
            {r: s["dice"] for r, s in scores.items()},
        )
        return save_figure(figure, path)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the site carries from round to round (an fp16 trainer's gradient scale too)."""
        scaler = self.trainer.scaler_state() if self.trainer else {}
        return {
            **pack(f"personal/{self.name}", self.personal),
            **pack(f"best/{self.name}", self.best.weights),
            **pack(f"scaler/{self.name}", scaler),
        }

    def load_state(self, tensors: dict[str, torch.Tensor], best_state: dict[str, Any]) -> None:
        self.personal = unpack(f"personal/{self.name}", tensors)
        self.best = Selected.restore(best_state, unpack(f"best/{self.name}", tensors))
        if self.trainer:
            self.trainer.load_scaler_state(unpack(f"scaler/{self.name}", tensors))


# --- set-up shared by every engine ---------------------------------------------------------------


def network_description(cfg: Config, spec: DatasetSpec) -> dict[str, Any]:
    """What a checkpoint's reader needs to rebuild the network and prepare inputs for it."""
    return {
        "in_channels": spec.in_channels,
        "num_classes": spec.num_classes,
        "context": spec.context,
        "regions": spec.regions,
        "image_size": cfg.data.image_size,
        "width": cfg.model.width,
        "depth": cfg.model.depth,
    }


def training_sites(cfg: Config, spec: DatasetSpec) -> list[str]:
    """The inside sites: every site but the held-out one."""
    if cfg.data.holdout is not None and cfg.data.holdout not in spec.sites:
        raise UserError(f"data.holdout: unknown site '{cfg.data.holdout}' (sites: {', '.join(spec.sites)})")
    sites = [s for s in spec.sites if s != cfg.data.holdout]
    if not sites:
        raise UserError("data.sites: no site left to train on")
    return sites


def make_client(
    cfg: Config, runtime: Runtime, spec: DatasetSpec, name: str, data: SiteData | None, train: list[Case] | None
) -> SiteClient:
    """A site's client computing where ``runtime`` says, training on the cases ``train`` (None: a
    site that only evaluates)."""
    build = network_builder(network_description(cfg, spec))
    trainer = None
    if train is not None:
        if not train:
            raise UserError(f"site '{name}': no training cases")
        images, masks = SliceDataset(train, spec.context).tensors()
        trainer = LocalTrainer(build, images, masks, cfg.train_settings(runtime))
    return SiteClient(name, trainer, data, spec, build, cfg.eval.batch_size, runtime.device)
