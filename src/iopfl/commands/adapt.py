"""``iopfl adapt``: outside personalization of a finished run (either engine) — adapt to an unseen site's images.

The experts are the run's val-selected global model and the val-selected personalised model of every
inside site that published it (``RUN/experts/<site>.safetensors``, listed in results.json): on a
deployment publishing is each site's opt-in, in-process ``fl.publish_personal``. Methods that route
among or average the experts need at least one published model; that is checked before anything is
written. The target is a site of the run's dataset (usually ``data.holdout``) or a folder of images /
NIfTI volumes. Predicted masks are written in the input's format; metrics are computed when labels exist.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iopfl.adapt import METHODS, build_method
from iopfl.adapt.iopfl import IOPFLRouting
from iopfl.commands.runs import OPT_IN, TrainedRun, open_run
from iopfl.config import Config, build_config, read_yaml
from iopfl.data import Case, load_dataset, load_unlabelled
from iopfl.data.writers import write_prediction
from iopfl.engine.rundir import RunDir
from iopfl.errors import UserError
from iopfl.evaluation.evaluate import labels_on_original_grid, score_case
from iopfl.evaluation.metrics import summarize_cases
from iopfl.fileio import atomic_write_text
from iopfl.report.gates import write_gates
from iopfl.report.tables import models_table, regions_table, safeguard_table
from iopfl.results import OutsideResults, SafeguardSummary, write_results
from iopfl.runtime import Runtime
from iopfl.track import TensorBoard, remove_logs


def target_cases(run: TrainedRun, target: str) -> list[Case]:
    """A site of the run's dataset that took no part in training (all its cases), or a folder."""
    if target in run.sites:
        raise UserError(f"--target: '{target}' took part in training; outside adaptation is for unseen sites")
    folder = Path(target)
    if folder.is_dir():
        return load_unlabelled(folder, run.network["image_size"])
    spec = load_dataset(run.cfg.for_sites(None).data)
    if target not in spec.sites:
        raise UserError(
            f"--target: '{target}' is neither a folder nor a site of the dataset (sites: {', '.join(spec.sites)})"
        )
    return spec.sites[target].all_cases()


def test_case_ids(cfg: Config, site: str) -> set[str]:
    """The ids of ``site``'s test split: benchmarks score every outside method (and the site's own
    oracle model, trained on its train split) on these cases, while adaptation sees all of them."""
    spec = load_dataset(cfg.for_sites([site]).data)
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
    for p, rows in zip(probs, owners, strict=True):
        for row, i in enumerate(rows):
            parts[i].append(p[row : row + 1])
    return [labels_on_original_grid(torch.cat(chunks), case) for chunks, case in zip(parts, cases, strict=True)]


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
        raise UserError(
            f"{run.path}: no inside site published its personalised model, which --method "
            f"{'/'.join(needy)} needs ({OPT_IN}); --method global, bn and tent need none"
        )


@dataclass
class Adaptation:
    """What :func:`adapt_cases` measured, per method name."""

    models: dict[str, Any] = field(default_factory=dict)  # scores: "sites", "mean" (+ "subsets"); with labels only
    safeguard: dict[str, dict] = field(default_factory=dict)  # fallback summary of each method that fell back
    traces: dict[str, list[dict]] = field(default_factory=dict)  # per-batch trace of each adaptive method


def adapt_cases(
    run: TrainedRun,
    cases: list[Case],
    methods: list[str],
    out: Path | None,
    cfg: Config,
    runtime: Runtime,
    scored: set[str] | None = None,
    subsets: dict[str, set[str]] | None = None,
) -> Adaptation:
    """Each method online over the same batches, on ``runtime``'s device; masks and the per-batch
    trace under ``out/<method>``; metrics with labels, on the cases whose ids are in ``scored`` (default:
    every case; adaptation always sees them all), and under ``"subsets"`` on each of ``subsets``' case
    sets (benchmarks: the cases a setting is chosen on, apart from those it is reported on)."""
    batches, owners = batches_of(cases, run.network["context"], cfg.adapt.batch_size)
    labelled = all(c.mask is not None for c in cases)
    regions = run.network["regions"]
    done = Adaptation()
    models = done.models
    for name in methods:
        method = build_method(name, run.experts(), run.build(), cfg.adapt, runtime.device)
        preds = assemble(method.adapt_and_predict(batches), owners, cases)
        guarded = bool(method.trace) and cfg.adapt.safeguard and method.fallbacks.batches > 0
        if guarded:
            done.safeguard[name] = method.fallbacks.summary()
        if out is not None:
            for case, pred in zip(cases, preds, strict=True):
                write_prediction(case, pred, out / name, run.network["num_classes"])
            if method.trace:
                write_trace(method.trace, out / name / "trace.jsonl")
                if cfg.track.tensorboard:
                    mirror_trace(method.trace, out / "tensorboard" / name)
            if isinstance(method, IOPFLRouting):  # what the router did: out/gates.json + gates.png
                summary = method.gate_summary(run.expert_names())
                write_gates({**summary, "safeguard": done.safeguard[name]} if guarded else summary, out)
        if labelled:
            per_case = [score_case(p, c, regions) for p, c in zip(preds, cases, strict=True)]
            summary = summarize_cases([s for s in per_case if scored is None or s["case"] in scored])
            models[name] = {"sites": {cases[0].site: summary}, "mean": summary}
            if subsets:
                models[name]["subsets"] = {
                    label: summarize_cases([s for s in per_case if s["case"] in ids]) for label, ids in subsets.items()
                }
        if method.trace:
            done.traces[name] = method.trace
    return done


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
    parts = [
        f"{m}: {s.fallbacks} of {s.batches} batches ({', '.join(f'{k} {v}' for k, v in s.reasons.items())})"
        for m, s in safeguard.items()
        if s.fallbacks
    ]
    if not parts:
        return None
    return (
        "warning: the safeguard saw signs of collapse and rolled back — "
        + "; ".join(parts)
        + ". Those batches were predicted from the last safe state or by BN-adapt; consider --method bn."
    )


def adapt_config(run: TrainedRun, overrides: list[str]) -> Config:
    """The run's config with today's test-time defaults and ``overrides``: a run's own ``adapt`` section
    records the defaults of the version that trained it (before outside safety: unguarded sigmoid
    gates), which is not what a user adapting today should silently get."""
    path = run.path / "config.yaml"
    tree = read_yaml(path)
    tree.pop("adapt", None)
    return build_config(tree, overrides, origin=str(path))


def adapt_runtime(cfg: Config) -> Runtime:
    """Where adaptation computes: ``cfg``'s runtime on this machine, in fp32 (no mixed precision at test time)."""
    return Runtime.resolve(cfg.runtime).in_fp32()


def run_adapt(run_dir: Path, target: str, method: str, out: Path, overrides: list[str]) -> OutsideResults:
    """``iopfl adapt``: adapt, write masks, and write results.json + report.md when labels exist."""
    run = open_run(run_dir)
    cfg = adapt_config(run, overrides)
    runtime = adapt_runtime(cfg)
    runtime.apply()  # runtime.threads and .deterministic hold here as in training
    methods = method_names(method)
    check_experts(run, methods)
    cases = target_cases(run, target)
    done = adapt_cases(run, cases, methods, out, cfg, runtime)
    models, safeguard = done.models, done.safeguard
    results = OutsideResults(
        method="outside",
        dataset=run.cfg.data.source,
        seed=cfg.adapt.seed,
        target=Path(target).name,
        experts=run.expert_names(),
        models=models,
        grid="original",
        safeguard=safeguard,
        compute=runtime.describe(),
    )
    write_results(RunDir(out).results, results)
    report = f"# Outside: {results.target}\n\n"
    if models:
        report += models_table(results.models) + regions_table(results.models)
    if safeguard:
        report += "\n" + safeguard_table(results.safeguard)
    atomic_write_text(out / "report.md", report)
    return results
