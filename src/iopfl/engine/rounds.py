"""The pieces of a round that need no state: which sites take part, whether a site's reply can be
aggregated, what a round writes to metrics.jsonl, and results.json at the end."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from iopfl.config import Config
from iopfl.engine.site import Scores, Selected, val_dice
from iopfl.engine.transport import Roster, Sites
from iopfl.fl import ClientReply, Strategy
from iopfl.fl.aggregation import clone_state
from iopfl.models import StateDict
from iopfl.results import GLOBAL, PERSONALIZED, EvalLine, LastRound, ModelEntry, RunResults
from iopfl.seeding import derive_generator, derive_seed


class FinishedRun(Protocol):
    """What results.json is made of (a :class:`~iopfl.engine.federation.Federation` at its end)."""

    cfg: Config
    sites: Sites
    strategy: Strategy
    roster: Roster
    best_global: Selected
    personal_best: dict[str, dict[str, Any]]
    last_eval: dict[str, Any]


def initial_weights(cfg: Config, build: Callable[[], torch.nn.Module]) -> StateDict:
    """θ^0: the same for every engine given the seed."""
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    return clone_state(build().state_dict())


def sample_clients(cfg: Config, clients: list[str], round_: int) -> list[str]:
    """The round's participants: ⌈fraction·K⌉ (at least ``min_clients``) drawn by a round-seeded RNG."""
    k = len(clients)
    m = min(k, max(cfg.fl.min_clients, math.ceil(cfg.fl.client_fraction * k - 1e-9)))
    if m == k:
        return list(clients)
    order = torch.randperm(k, generator=derive_generator(cfg.seed, "sample", round_))[:m]
    return [clients[i] for i in sorted(order.tolist())]


def is_eval_round(cfg: Config, round_: int) -> bool:
    return round_ % cfg.eval.eval_every == 0 or round_ == cfg.fl.rounds


def check_reply(reply: ClientReply, global_weights: StateDict) -> str | None:
    """Why a site's reply cannot be aggregated (None: it can): every key it sends must be a key of the
    global weights with the same shape and dtype, every value finite, the sample count positive."""
    if reply.num_samples <= 0:
        return f"sample count {reply.num_samples} is not positive"
    return check_weights(reply.weights, global_weights)


def check_weights(weights: StateDict, reference: StateDict, complete: bool = False) -> str | None:
    """Why ``weights`` do not fit the model ``reference`` describes (None: they do); ``complete``:
    every key of the model must be there too (a whole model, e.g. a published expert)."""
    missing = [k for k in reference if k not in weights] if complete else []
    if missing:
        return f"'{missing[0]}' is missing ({len(missing)} keys of the model in all)"
    for key, value in weights.items():
        ref = reference.get(key)
        if ref is None:
            return f"it sent '{key}', which the model does not have"
        if value.shape != ref.shape or value.dtype != ref.dtype:
            return (
                f"'{key}' has shape {tuple(value.shape)} and dtype {value.dtype}, the model "
                f"{tuple(ref.shape)} and {ref.dtype}"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"'{key}' holds non-finite values"
    return None


def metric_lines(round_: int, scores: dict[str, Scores]) -> list[EvalLine]:
    """metrics.jsonl lines of one evaluation: one per (model, split, site)."""
    keys = ("dice", "hd95", "assd", "ref_dice", "n")
    return [
        EvalLine(round=round_, model=model, split=split, site=site, **{k: summary[k] for k in keys if k in summary})
        for site, by_model in scores.items()
        for model, by_split in by_model.items()
        for split, summary in by_split.items()
    ]


def val_dice_by_site(scores: dict[str, Scores]) -> dict[str, float]:
    """Val Dice per site of the personalised model (the global one for strategies without it)."""
    out = {}
    for site, by_model in scores.items():
        model = PERSONALIZED if PERSONALIZED in by_model else GLOBAL
        value = val_dice(by_model[model])
        out[site] = float("nan") if value is None else value
    return out


def distance_unit(source: str) -> str:
    """HD95/ASSD are in mm for volumes (voxel spacing) and in original pixels for 2D images."""
    return "mm" if source in ("prostate", "synthetic") else "pixels"


def model_entry(sites: dict[str, dict]) -> ModelEntry:
    from iopfl.evaluation.metrics import summarize_sites

    return ModelEntry.model_validate({"sites": sites, "mean": summarize_sites(list(sites.values()))})


def results_json(run: FinishedRun, published: list[str]) -> RunResults:
    """results.json (docs/ARCHITECTURE.md, "run directory"): val-selected models under ``models``, the
    last round under ``last_round``, the sites whose personalised models were published."""
    cfg, sites, models = run.cfg, run.roster.sites, run.strategy.models
    chosen: dict[str, ModelEntry] = {}
    selection: dict[str, int | dict[str, int]] = {}
    if GLOBAL in models:
        chosen[GLOBAL] = model_entry(run.best_global.test)
        selection[GLOBAL] = run.best_global.round
    if PERSONALIZED in models:
        chosen[PERSONALIZED] = model_entry({s: run.personal_best[s]["test"] for s in sites})
        selection[PERSONALIZED] = {s: run.personal_best[s]["round"] for s in sites}
    scores = run.last_eval["scores"]
    last = {m: model_entry({s: scores[s][m]["test"] for s in sites}) for m in models}
    return RunResults(
        method=run.strategy.name,
        federated=run.strategy.federated,
        engine=run.sites.engine,
        dataset=cfg.data.source,
        seed=cfg.seed,
        rounds=cfg.fl.rounds,
        sites=sites,
        holdout=cfg.data.holdout,
        models=chosen,
        last_round=LastRound(round=run.last_eval["round"], models=last),
        selection=selection,
        published=published,
        experts={s: f"experts/{s}.safetensors" for s in published},
        units={"dice": "fraction", **dict.fromkeys(("hd95", "assd"), distance_unit(cfg.data.source))},
        grid="original",  # scored at each input's own size and spacing (2D distances: pixels)
    )
