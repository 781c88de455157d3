"""The federation core: the round loop, val-based model selection, the run directory and the checkpoint, written once
for every engine.

An engine is only a transport (:class:`Sites`): it reaches the sites to fit a round, evaluate a round and, at the
end, publish the val-selected personal models of the sites that opted in. The in-process engine calls site objects
directly (:mod:`iopfl.engine.inprocess`); the Flower ServerApp sends messages (:mod:`iopfl.engine.flower.server`).
One round: sample the trainers (seeded by the round), each runs the strategy's client half, every valid reply is
aggregated in site order. Every ``eval_every`` rounds (and at the last) each site scores the global and its
personalised model on val and test; selection reads val only. A checkpoint after every round makes resuming exact.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from iopfl.config import Config
from iopfl.engine.checkpoint import pack, read_run_checkpoint, save_checkpoint, save_run_checkpoint, unpack
from iopfl.engine.rounds import (
    check_reply,
    check_weights,
    initial_weights,
    is_eval_round,
    metric_lines,
    results_json,
    sample_clients,
    val_dice_by_site,
)
from iopfl.engine.rundir import RunDir, RunLog, manifest
from iopfl.engine.site import Scores, Selected, val_dice
from iopfl.engine.tracking import open_board, selection_scalars, training_lr
from iopfl.engine.transport import Progress, Roster, Sites
from iopfl.errors import UserError
from iopfl.fileio import atomic_write_text
from iopfl.fl import ClientReply
from iopfl.models import StateDict, network_builder
from iopfl.results import GLOBAL, LOCAL, TrainLine, write_results
from iopfl.track import remove_logs


class Federation:
    """One federated run over ``sites``, writing ``run_dir`` (config, manifest, metrics, checkpoint,
    published experts, results, report)."""

    roster: Roster  # who takes part: set when the run connects to its sites

    def __init__(
        self, cfg: Config, run_dir: Path, sites: Sites, progress: Progress | None = None, runlog: RunLog | None = None
    ):
        self.cfg, self.dir, self.sites, self.progress = cfg, RunDir(run_dir), sites, progress
        self.log = runlog or RunLog(self.dir, logging.getLogger(__name__))
        self.strategy = sites.strategy  # one per run: the transport's
        self.round = 0
        self.global_weights: StateDict = {}
        self.best_global = Selected()
        self.last_eval: dict[str, Any] = {}
        self.personal_best: dict[str, dict[str, Any]] = {}
        self.run_key = ""

    # --- the run ---------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        try:
            return self._run(resume)
        finally:
            self.sites.close()
            if self.dir.tensorboard is not None:
                self.dir.tensorboard.close()

    def _run(self, resume: bool) -> dict[str, Any]:
        checkpoint = self._checkpoint(resume)
        self.run_key = checkpoint[1]["run_key"] if checkpoint else uuid.uuid4().hex[:16]
        self.roster = self.sites.connect(self.run_key, checkpoint[1]["sites"] if checkpoint else None)
        self.dir.create()  # after connecting: data that cannot be read leaves no folder behind
        self.global_weights = initial_weights(self.cfg, network_builder(self.roster.network))
        if checkpoint:
            self._restore(*checkpoint)
        else:
            self._start()
        open_board(self.cfg, self.dir, self.log.note, self.strategy.models, None if checkpoint is None else self.round)
        total = self.cfg.fl.rounds
        if self.progress:
            self.progress.start(total, self.round + 1, len(sample_clients(self.cfg, self.roster.trainers, 1)))
        while self.round < total:
            round_ = self.round + 1
            started = time.perf_counter()
            self._train_round(round_)
            self.round = round_
            trained = time.perf_counter()
            if is_eval_round(self.cfg, round_):
                self._evaluate_round(round_)
            self._save()
            # where the time goes, for choosing eval.eval_every, workers, devices
            self.log.info(
                f"round {round_}: trained in {trained - started:.1f} s, evaluated and "
                f"checkpointed in {time.perf_counter() - trained:.1f} s"
            )
        return self._finish()

    def _train_round(self, round_: int) -> None:
        chosen = sample_clients(self.cfg, self.roster.trainers, round_)
        good: dict[str, ClientReply] = {}
        for name, reply in self.sites.fit(round_, chosen, self.global_weights):
            reason = reply if isinstance(reply, str) else check_reply(reply, self.global_weights)
            if reason or isinstance(reply, str):  # a str reply is the reason, even an empty one
                self.log.note(f"round {round_}: site {name} is left out of training: {reason}")
                continue
            good[name] = reply
            loss = float(reply.metrics.get("loss", float("nan")))
            self.dir.append_metrics(
                [
                    TrainLine(
                        round=round_, model=LOCAL, split="train", site=name, loss=loss, lr=training_lr(self.cfg, round_)
                    )
                ]
            )
            if self.progress:
                self.progress.client_done(round_, name, loss)
        if len(good) < self.cfg.fl.min_clients:
            raise UserError(
                f"round {round_}: {len(good)} of {len(chosen)} sites replied, "
                f"fewer than fl.min_clients={self.cfg.fl.min_clients}; stopping"
            )
        # in the sampled order whatever the order of arrival: the float sums are the same every time
        replies = [(good[s].weights, good[s].num_samples) for s in chosen if s in good]
        self.global_weights = self.strategy.aggregate(self.global_weights, replies)

    def _evaluate_round(self, round_: int) -> None:
        sites = self.roster.sites
        replies = self.sites.evaluate(round_, sites, self.global_weights)
        good = {}
        for site in sites:
            reply = replies.get(site, "no reply")
            if isinstance(reply, str):
                self.log.note(f"round {round_}: site {site} is left out of evaluation: {reply}")
                continue
            good[site] = reply
            self.personal_best[site] = reply.best
        if len(good) < len(sites):
            self.log.note(f"round {round_}: not every site was evaluated; model selection skips this round")
            return
        scores = {s: good[s].scores for s in sites}
        self._select(round_, scores)
        self.dir.append_metrics(metric_lines(round_, scores))
        if self.dir.tensorboard is not None:
            self.dir.tensorboard.scalars(
                selection_scalars(self.strategy.models, self.best_global.round, self.personal_best, round_)
            )
        if self.progress:
            self.progress.round_done(round_, val_dice_by_site(scores))

    def _select(self, round_: int, scores: dict[str, Scores]) -> None:
        """Keep the round's scores; select the global model by mean val Dice over the sites."""
        self.last_eval = {"round": round_, "scores": scores}
        if GLOBAL not in self.strategy.models:
            return
        sites = self.roster.sites
        vals = [v for s in sites if (v := val_dice(scores[s][GLOBAL])) is not None]
        mean_val = sum(vals) / len(vals) if len(vals) == len(sites) else None
        self.best_global.offer(round_, mean_val, {s: scores[s][GLOBAL]["test"] for s in sites}, self.global_weights)

    def _finish(self) -> dict[str, Any]:
        """Publish the opted-in experts, then write results.json and report.md."""
        if not self.last_eval:
            raise UserError("no round was evaluated by every site: no results to report")
        overlay_sites = self.roster.sites[: self.cfg.eval.overlays]
        published = self.sites.publish(self.best_global.weights, overlay_sites)
        stored = []
        for site in self.roster.sites:
            weights = published.get(site)
            if not weights:
                continue
            reason = check_weights(weights, self.global_weights, complete=True)
            if reason:
                self.log.note(f"site {site} published a model that is not this run's network ({reason}); not stored")
                continue
            save_checkpoint(self.dir.expert(site), weights, {"site": site, "round": self.personal_best[site]["round"]})
            stored.append(site)
            self.log.info(f"site {site} published its personalised model: {self.dir.expert(site)}")
        results = results_json(self, stored)
        write_results(self.dir.results, results)
        from iopfl.report.run_report import write_run_report  # matplotlib only when a run finishes

        write_run_report(self.dir.path)
        if self.dir.tensorboard is not None:  # the overlays the sites drew (on Flower: those the server has)
            self.dir.tensorboard.images(sorted((self.dir.plots / "overlays").glob("*.png")), self.round, "overlays")
        self.log.info(f"run complete: {self.dir.results}")
        return results.dump()

    # --- run directory, checkpoint, resume --------------------------------------------------------
    def _checkpoint(self, resume: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The checkpoint to resume from, checked (None: a new run)."""
        exists = self.dir.checkpoint.exists()
        if exists and not resume:
            raise UserError(
                f"{self.dir.path}: already holds a run; pass --resume to continue it or choose another --out"
            )
        if exists:
            return read_run_checkpoint(self.dir.checkpoint, self.sites.engine, self.cfg.digest())
        self.dir.metrics.unlink(missing_ok=True)  # what a run that died before its first checkpoint left
        (self.dir.path / "run.log").unlink(missing_ok=True)
        remove_logs(self.dir.tensorboard_dir)
        return None

    def _start(self) -> None:
        atomic_write_text(self.dir.path / "config.yaml", self.cfg.to_yaml())
        self.dir.write_json(
            "manifest.json",
            {
                **manifest(self.cfg.seed, self.cfg.digest()),
                "engine": self.sites.engine,
                "run_key": self.run_key,
                "devices": self.roster.devices,
            },
        )

    def _save(self) -> None:
        site_tensors, site_state = self.sites.state()
        tensors = {
            **pack(GLOBAL, self.global_weights),
            **pack(f"best/{GLOBAL}", self.best_global.weights),
            **site_tensors,
            "rng/torch": torch.get_rng_state(),
        }
        state = {
            "method": self.strategy.name,
            "run_key": self.run_key,
            "sites": self.roster.sites,
            "network": self.roster.network,
            "round": self.round,
            "best_global": self.best_global.state(),
            "last_eval": self.last_eval,
            "personal_best": self.personal_best,
            "site_state": site_state,
        }
        save_run_checkpoint(self.dir.checkpoint, tensors, state, self.sites.engine, self.cfg.digest())

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.global_weights = unpack(GLOBAL, tensors)
        self.best_global = Selected.restore(state["best_global"], unpack(f"best/{GLOBAL}", tensors))
        self.last_eval, self.personal_best = state["last_eval"], state["personal_best"]
        self.sites.load_state(tensors, state["site_state"])
        torch.set_rng_state(tensors["rng/torch"])
        self.dir.trim_metrics(self.round)
        self.log.info(f"resumed from {self.dir.checkpoint} at round {self.round}")
