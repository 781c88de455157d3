"""Predict whole cases with a model and score them: the bridge from data + model to metrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from iopfl.data import Case, DatasetSpec, case_inputs
from iopfl.evaluation.metrics import case_metrics, reference_dice, summarize_cases


@torch.inference_mode()
def predict_probs(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Softmax probabilities ``[S, K, H, W]`` for inputs ``[S, C, H, W]``, in eval mode."""
    model.eval()
    outs = [model(inputs[i : i + batch_size]).softmax(dim=1) for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs)


def predict_case(model: nn.Module, case: Case, context: int, batch_size: int) -> np.ndarray:
    """Class map ``[S, H, W]`` (uint8) for every slice of ``case``."""
    probs = predict_probs(model, case_inputs(case, context), batch_size)
    return probs.argmax(dim=1).to(torch.uint8).numpy()


def score_case(pred: np.ndarray, case: Case, regions: dict[str, list[int]]) -> dict:
    """Per-case metrics: region-wise Dice/HD95/ASSD plus the published reference Dice."""
    scores = case_metrics(pred, case.mask, regions, case.spacing)
    return {"case": case.case_id, "regions": scores, "ref_dice": reference_dice(pred, case.mask)}


def evaluate_cases(model: nn.Module, cases: Sequence[Case], spec: DatasetSpec, batch_size: int) -> dict:
    """Site summary (means over cases, ``n`` = number of cases) of ``model`` on labelled ``cases``."""
    per_case = [score_case(predict_case(model, c, spec.context, batch_size), c, spec.regions) for c in cases]
    return summarize_cases(per_case)
