"""Predict whole cases with a model and score them: the bridge from data + model to metrics.

Scores are computed on each case's original grid (the input file's in-plane size and voxel spacing),
not on the training grid: the network's probabilities are upsampled bilinearly to that size, then
argmax'ed, and compared with the original-resolution labels. Evaluation, outside adaptation and
``iopfl predict`` all go through :func:`labels_on_original_grid`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iopfl.data import Case, DatasetSpec, case_inputs
from iopfl.evaluation.metrics import case_metrics, reference_dice, summarize_cases


@torch.inference_mode()
def predict_probs(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Softmax probabilities ``[S, K, H, W]`` (on the CPU) for inputs ``[S, C, H, W]``, computed in eval
    mode on the model's device (the CPU for a model without parameters: an ONNX Runtime session)."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    outs = [
        model(inputs[i : i + batch_size].to(device)).softmax(dim=1).cpu() for i in range(0, len(inputs), batch_size)
    ]
    return torch.cat(outs)


def predict_case(model: nn.Module, case: Case, context: int, batch_size: int) -> np.ndarray:
    """Class map ``[S, H, W]`` (uint8) for every slice of ``case``, on the training grid (overlays)."""
    return channel_argmax(predict_probs(model, case_inputs(case, context), batch_size)).numpy()


def labels_on_original_grid(probs: torch.Tensor, case: Case) -> np.ndarray:
    """Class map ``[S, H0, W0]`` (uint8) on ``case``'s original grid from probabilities ``[S, K, H, W]``
    on the training grid: bilinear upsampling of the probabilities, then argmax (a nearest-resized label
    map would add blocky edges the network never predicted)."""
    size = case.original_size
    if tuple(probs.shape[-2:]) != size:
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    return channel_argmax(probs).numpy()


def channel_argmax(probs: torch.Tensor) -> torch.Tensor:
    """``probs.argmax(dim=1)`` as uint8 ``[S, H, W]`` (ties → the first class, as argmax), by comparing
    the few class planes: torch's CPU argmax over a short channel axis took 0.3 s per megapixel image,
    more than everything else the evaluation does."""
    best, labels = probs[:, 0], torch.zeros(probs.shape[:1] + probs.shape[2:], dtype=torch.uint8)
    for k in range(1, probs.shape[1]):
        better = probs[:, k] > best
        labels[better] = k
        best = torch.maximum(best, probs[:, k])
    return labels


def predict_original(model: nn.Module, case: Case, context: int, batch_size: int) -> np.ndarray:
    """Class map ``[S, H0, W0]`` (uint8) of ``case`` on its original grid."""
    return labels_on_original_grid(predict_probs(model, case_inputs(case, context), batch_size), case)


def score_case(pred: np.ndarray, case: Case, regions: dict[str, list[int]]) -> dict:
    """Per-case metrics of ``pred [S, H0, W0]`` against the case's labels on its original grid:
    region-wise Dice/HD95/ASSD (original pixels for 2D, mm for volumes) plus the reference Dice."""
    truth = case.truth()
    scores = case_metrics(pred, truth, regions, case.grid_spacing())
    return {"case": case.case_id, "regions": scores, "ref_dice": reference_dice(pred, truth)}


def evaluate_cases(model: nn.Module, cases: Sequence[Case], spec: DatasetSpec, batch_size: int) -> dict:
    """Site summary (means over cases, ``n`` = number of cases) of ``model`` on labelled ``cases``."""
    per_case = [score_case(predict_original(model, c, spec.context, batch_size), c, spec.regions) for c in cases]
    return summarize_cases(per_case)
