"""``iopfl predict``: segment new images or volumes with a site's val-selected model (or the global one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from iopfl.commands.runs import OPT_IN, TrainedRun, open_run
from iopfl.data import Case, load_unlabelled
from iopfl.data.writers import write_prediction
from iopfl.engine.checkpoint import unpack
from iopfl.engine.flower.state import SiteStateStore
from iopfl.errors import UserError
from iopfl.evaluation.evaluate import predict_original
from iopfl.fl import STRATEGIES
from iopfl.models import StateDict
from iopfl.models.routing import load_expert
from iopfl.results import GLOBAL, PERSONALIZED
from iopfl.runtime import Runtime


def run_predict(
    run_dir: Path,
    site: str,
    inputs: list[Path],
    out: Path,
    model: str,
    state_dir: Path | None = None,
    device: str | None = None,
) -> list[Path]:
    """``iopfl predict``: segment files/folders with ``site``'s val-selected model (or the global one),
    on ``device`` (default: the run's ``runtime.device``)."""
    run = open_run(run_dir)
    runtime = Runtime.resolve(run.cfg.runtime, device, "--device")
    runtime.apply()
    net = load_expert(run.build(), selected_weights(run, site, model, state_dir), 0).to(runtime.device)
    return predict_inputs(net, run.network, inputs, out, run.cfg.eval.batch_size)


def selected_weights(run: TrainedRun, site: str, model: str, state_dir: Path | None) -> StateDict:
    """``site``'s val-selected personalised model, or the run's val-selected global one."""
    if model not in (PERSONALIZED, GLOBAL):
        raise UserError(f"--model: expected {PERSONALIZED} or {GLOBAL}, got '{model}'")
    if site not in run.sites:
        raise UserError(f"--site: '{site}' is not an inside site of {run.path} (sites: {', '.join(run.sites)})")
    return personal_weights(run, site, state_dir) if model == PERSONALIZED else run.global_weights


def predict_inputs(
    net: torch.nn.Module, network: dict[str, Any], inputs: list[Path], out: Path, batch_size: int
) -> list[Path]:
    """Masks of every file/folder in ``inputs`` written under ``out``, prepared for ``network``
    (``image_size``, ``context``, ``in_channels``, ``num_classes``): a run's model or an exported one."""
    written = []
    for path in inputs:
        for case in _input_cases(Path(path), network["image_size"]):
            channels = case.image.shape[1] * (2 * network["context"] + 1)
            if channels != network["in_channels"]:
                raise UserError(
                    f"{case.source}: gives {channels} input channels, the model takes "
                    f"{network['in_channels']} (an image for a volume model, or the reverse?)"
                )
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
        raise UserError(
            f"{run.path}: site {site} did not publish its personalised model ({OPT_IN}); on "
            f"{site}'s own machine pass --state-dir (its node config state-dir)"
        )
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
