"""Outside personalization of a finished run (either engine): adapt to an unseen site's images.

The experts are the run's val-selected global model and the val-selected personalised model of every
inside site that published it (``RUN/experts/<site>.safetensors``, listed in results.json): on a
deployment publishing is each site's opt-in, in-process ``fl.publish_personal``. Methods that route
among or average the experts need at least one published model; that is checked before anything is
written. The target is a site of the run's dataset (usually ``data.holdout``) or a folder of images /
NIfTI volumes. Predicted masks are written in the input's format; metrics are computed when labels exist.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iopfl.adapt import METHODS, build_method
from iopfl.adapt.iopfl import IOPFLRouting
from iopfl.config import Config, build_config, load_config, read_yaml
from iopfl.data import Case, load_dataset, load_unlabelled
from iopfl.data.writers import write_prediction
from iopfl.engine.checkpoint import load_checkpoint, read_run_checkpoint, unpack
from iopfl.engine.flower.state import SiteStateStore
from iopfl.engine.rundir import RunDir
from iopfl.engine.site import network_builder
from iopfl.errors import UserError
from iopfl.fileio import atomic_write_text
from iopfl.evaluation.evaluate import labels_on_original_grid, predict_original, score_case
from iopfl.evaluation.metrics import summarize_cases
from iopfl.fl import STRATEGIES
from iopfl.fl.aggregation import StateDict
from iopfl.models.routing import load_expert
from iopfl.report.gates import write_gates
from iopfl.report.tables import models_table, regions_table, safeguard_table
from iopfl.results import GLOBAL, PERSONALIZED, OutsideResults, SafeguardSummary, read_run_results, write_results
from iopfl.runtime import apply_runtime, describe, resolve_device
from iopfl.track import TensorBoard, remove_logs


@dataclass
class TrainedRun:
    """What ``adapt`` and ``predict`` need from a run directory."""

    path: Path
    cfg: Config
    network: dict[str, Any]          # in_channels, num_classes, context, regions, image_size, width, depth
    sites: list[str]                 # the inside sites
    run_key: str
    global_weights: StateDict        # val-selected θ*
    personal: dict[str, StateDict]   # the published val-selected φ_k*, by site (in site order)

    def build(self) -> Callable[[], torch.nn.Module]:
        return network_builder(self.network)

    def experts(self) -> list[StateDict]:
        """[θ*, then every published φ_k*]."""
        return [self.global_weights, *self.personal.values()]

    def expert_names(self) -> list[str]:
        return [GLOBAL, *self.personal]


OPT_IN = ("on a Flower deployment a site publishes its model only with node config publish-personal='true'; "
          "in-process with fl.publish_personal=true")


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


def target_cases(run: TrainedRun, target: str) -> list[Case]:
    """A site of the run's dataset that took no part in training (all its cases), or a folder."""
    if target in run.sites:
        raise UserError(f"--target: '{target}' took part in training; outside adaptation is for unseen sites")
    folder = Path(target)
    if folder.is_dir():
        return load_unlabelled(folder, run.network["image_size"])
    spec = load_dataset(run.cfg.data.model_copy(update={"sites": None}))
    if target not in spec.sites:
        raise UserError(f"--target: '{target}' is neither a folder nor a site of the dataset "
                        f"(sites: {', '.join(spec.sites)})")
    return spec.sites[target].all_cases()


def test_case_ids(cfg: Config, site: str) -> set[str]:
    """The ids of ``site``'s test split: benchmarks score every outside method (and the site's own
    oracle model, trained on its train split) on these cases, while adaptation sees all of them."""
    spec = load_dataset(cfg.data.model_copy(update={"sites": [site], "holdout": None}))
    return {c.case_id for c in spec.sites[site].test}


def batches_of(cases: list[Case], context: int, batch_size: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """The cases' inputs cut into batches of at most ``batch_size`` in case order, with the case index
    of every row. A volume's slices are batched within the volume (its statistics are its own); 2D
    images (one slice per case) are packed together, so a stream of frames adapts on batches of
    ``batch_size`` images rather than one image at a time."""
    from iopfl.data import case_inputs

    batches: list[torch.Tensor] = []
    owners: list[list[int]] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if pending:
            batches.append(torch.cat([x for _, x in pending]))
            owners.append([i for i, _ in pending])
            pending.clear()

    for i, case in enumerate(cases):
        inputs = case_inputs(case, context)
        if len(inputs) == 1:
            pending.append((i, inputs))
            if len(pending) == batch_size:
                flush()
            continue
        flush()
        for start in range(0, len(inputs), batch_size):
            batches.append(inputs[start : start + batch_size])
            owners.append([i] * len(batches[-1]))
    flush()
    return batches, owners


def assemble(probs: list[torch.Tensor], owners: list[list[int]], cases: list[Case]) -> list[np.ndarray]:
    """Per-case class maps ``[S, H0, W0]`` on each case's original grid from per-batch probabilities
    ``[B, K, H, W]`` whose rows belong to the cases ``owners`` names."""
    parts: list[list[torch.Tensor]] = [[] for _ in cases]
    for p, rows in zip(probs, owners):
        for row, i in enumerate(rows):
            parts[i].append(p[row : row + 1])
    return [labels_on_original_grid(torch.cat(chunks), case) for chunks, case in zip(parts, cases)]


def method_names(method: str) -> list[str]:
    if method == "all":
        return list(METHODS)
    if method not in METHODS:
        raise UserError(f"--method: unknown method '{method}' (choose from all, {', '.join(METHODS)})")
    return [method]


def check_experts(run: TrainedRun, methods: list[str]) -> None:
    """Refuse, before anything is written, methods that need a published personalised model."""
    needy = [m for m in methods if METHODS[m].needs_personal]
    if needy and not run.personal:
        raise UserError(f"{run.path}: no inside site published its personalised model, which --method "
                        f"{'/'.join(needy)} needs ({OPT_IN}); --method global, bn and tent need none")


def adapt_cases(run: TrainedRun, cases: list[Case], methods: list[str], out: Path | None,
                cfg: Config, scored: set[str] | None = None,
                safeguard: dict[str, dict] | None = None,
                subsets: dict[str, set[str]] | None = None,
                traces: dict[str, list[dict]] | None = None) -> dict[str, Any]:
    """Each method online over the same batches; masks and the per-batch trace under ``out/<method>``;
    metrics with labels, on the cases whose ids are in ``scored`` (default: every case; adaptation
    always sees them all), and under ``"subsets"`` on each of ``subsets``' case sets (benchmarks: the
    cases a setting is chosen on, apart from those it is reported on). ``safeguard`` receives each
    adaptive method's fallback summary, ``traces`` its per-batch trace."""
    batches, owners = batches_of(cases, run.network["context"], cfg.adapt.batch_size)
    labelled = all(c.mask is not None for c in cases)
    regions = run.network["regions"]
    models: dict[str, Any] = {}
    for name in methods:
        method = build_method(name, run.experts(), run.build(), cfg.adapt, resolve_device(cfg.runtime.device))
        preds = assemble(method.adapt_and_predict(batches), owners, cases)
        guarded = bool(method.trace) and cfg.adapt.safeguard and method.fallbacks.batches > 0
        if safeguard is not None and guarded:
            safeguard[name] = method.fallbacks.summary()
        if out is not None:
            for case, pred in zip(cases, preds):
                write_prediction(case, pred, out / name, run.network["num_classes"])
            if method.trace:
                write_trace(method.trace, out / name / "trace.jsonl")
                if cfg.track.tensorboard:
                    mirror_trace(method.trace, out / "tensorboard" / name)
            if isinstance(method, IOPFLRouting):  # what the router did: out/gates.json + gates.png
                summary = method.gate_summary(run.expert_names())
                write_gates({**summary, "safeguard": method.fallbacks.summary()} if guarded else summary, out)
        if labelled:
            per_case = [score_case(p, c, regions) for p, c in zip(preds, cases)]
            summary = summarize_cases([s for s in per_case if scored is None or s["case"] in scored])
            models[name] = {"sites": {cases[0].site: summary}, "mean": summary}
            if subsets:
                models[name]["subsets"] = {label: summarize_cases([s for s in per_case if s["case"] in ids])
                                           for label, ids in subsets.items()}
        if traces is not None and method.trace:
            traces[name] = method.trace
    return models


def write_trace(trace: list[dict[str, Any]], path: Path) -> None:
    """One JSON line per batch of the last pass: loss terms and the safeguard's signals."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in trace))


def mirror_trace(trace: list[dict[str, Any]], logdir: Path) -> None:
    """The trace in TensorBoard (step = batch), replacing what an earlier adaptation logged there."""
    remove_logs(logdir)
    board = TensorBoard(logdir, logging.getLogger(__name__).warning)
    board.trace(trace)
    board.close()


def fallback_warning(safeguard: dict[str, SafeguardSummary]) -> str | None:
    """One line when the safeguard fell back on any batch of any method, else None."""
    parts = [f"{m}: {s.fallbacks} of {s.batches} batches ({', '.join(f'{k} {v}' for k, v in s.reasons.items())})"
             for m, s in safeguard.items() if s.fallbacks]
    if not parts:
        return None
    return ("warning: the safeguard saw signs of collapse and rolled back — " + "; ".join(parts)
            + ". Those batches were predicted from the last safe state or by BN-adapt; consider --method bn.")


def adapt_config(run: TrainedRun, overrides: list[str]) -> Config:
    """The run's config with today's test-time defaults and ``overrides``: a run's own ``adapt`` section
    records the defaults of the version that trained it (before outside safety: unguarded sigmoid
    gates), which is not what a user adapting today should silently get."""
    path = run.path / "config.yaml"
    tree = read_yaml(path)
    tree.pop("adapt", None)
    return build_config(tree, overrides, origin=str(path))


def run_adapt(run_dir: Path, target: str, method: str, out: Path, overrides: list[str]) -> OutsideResults:
    """``iopfl adapt``: adapt, write masks, and write results.json + report.md when labels exist."""
    run = open_run(run_dir)
    cfg = adapt_config(run, overrides)
    device = resolve_device(cfg.runtime.device)
    apply_runtime(cfg.runtime, device)   # runtime.threads and .deterministic hold here as in training
    methods = method_names(method)
    check_experts(run, methods)
    cases = target_cases(run, target)
    safeguard: dict[str, dict] = {}
    models = adapt_cases(run, cases, methods, out, cfg, safeguard=safeguard)
    results = OutsideResults(method="outside", dataset=run.cfg.data.source, seed=cfg.adapt.seed,
                             target=Path(target).name, experts=run.expert_names(), models=models, grid="original",
                             safeguard=safeguard, compute=describe(device, "fp32"))
    write_results(RunDir(out).results, results)
    report = f"# Outside: {results.target}\n\n"
    if models:
        report += models_table(results.models) + regions_table(results.models)
    if safeguard:
        report += "\n" + safeguard_table(results.safeguard)
    atomic_write_text(out / "report.md", report)
    return results


def run_predict(run_dir: Path, site: str, inputs: list[Path], out: Path, model: str,
                state_dir: Path | None = None, device: str | None = None) -> list[Path]:
    """``iopfl predict``: segment files/folders with ``site``'s val-selected model (or the global one),
    on ``device`` (default: the run's ``runtime.device``)."""
    run = open_run(run_dir)
    where = resolve_device(device, "--device") if device else resolve_device(run.cfg.runtime.device)
    apply_runtime(run.cfg.runtime, where)
    net = load_expert(run.build(), selected_weights(run, site, model, state_dir), 0).to(where)
    return predict_inputs(net, run.network, inputs, out, run.cfg.eval.batch_size)


def selected_weights(run: TrainedRun, site: str, model: str, state_dir: Path | None) -> StateDict:
    """``site``'s val-selected personalised model, or the run's val-selected global one."""
    if model not in (PERSONALIZED, GLOBAL):
        raise UserError(f"--model: expected {PERSONALIZED} or {GLOBAL}, got '{model}'")
    if site not in run.sites:
        raise UserError(f"--site: '{site}' is not an inside site of {run.path} (sites: {', '.join(run.sites)})")
    return personal_weights(run, site, state_dir) if model == PERSONALIZED else run.global_weights


def predict_inputs(net: torch.nn.Module, network: dict[str, Any], inputs: list[Path], out: Path,
                   batch_size: int) -> list[Path]:
    """Masks of every file/folder in ``inputs`` written under ``out``, prepared for ``network``
    (``image_size``, ``context``, ``in_channels``, ``num_classes``): a run's model or an exported one."""
    written = []
    for path in inputs:
        for case in _input_cases(Path(path), network["image_size"]):
            channels = case.image.shape[1] * (2 * network["context"] + 1)
            if channels != network["in_channels"]:
                raise UserError(f"{case.source}: gives {channels} input channels, the model takes "
                                f"{network['in_channels']} (an image for a volume model, or the reverse?)")
            pred = predict_original(net, case, network["context"], batch_size)
            written.append(write_prediction(case, pred, out, network["num_classes"]))
    return written


def personal_weights(run: TrainedRun, site: str, state_dir: Path | None) -> StateDict:
    """``site``'s published personalised model, else the one in its own state folder (on its machine)."""
    if PERSONALIZED not in STRATEGIES[run.cfg.fl.method].models:
        raise UserError(f"{run.path}: method '{run.cfg.fl.method}' has no personalized model; use --model global")
    if site in run.personal:
        return run.personal[site]
    if state_dir is None:
        raise UserError(f"{run.path}: site {site} did not publish its personalised model ({OPT_IN}); on "
                        f"{site}'s own machine pass --state-dir (its node config state-dir)")
    folder = Path(state_dir) / f"{run.run_key}-{site}"
    snapshot = SiteStateStore(folder).latest()
    weights = unpack(f"best/{site}", snapshot[0]) if snapshot else {}
    if not weights:
        raise UserError(f"{folder}: no selected personalised model of site {site} for this run")
    return weights


def _input_cases(path: Path, image_size: int) -> list[Case]:
    from iopfl.data.images2d import image_to_case
    from iopfl.data.io import is_nifti, nifti_stem
    from iopfl.data.prostate import volume_to_case

    if path.is_dir():
        return load_unlabelled(path, image_size)
    if not path.exists():
        raise UserError(f"{path}: input not found")
    if is_nifti(path):
        return [volume_to_case(path.parent.name, nifti_stem(path), path, None, image_size)]
    return [image_to_case(path.parent.name, path.stem, path, None, image_size)]
