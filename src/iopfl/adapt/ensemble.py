"""``ensemble``: the mean softmax of the E experts — global θ* and every personalised φ_k* — each in
eval mode with its own running statistics (model averaging in output space; cf. Lakshminarayanan
et al., NeurIPS 2017).

Update rule: none. Prediction: (1/E)·Σ_e softmax(f_e(x)).
"""

import torch
from torch import nn

from iopfl.adapt.base import TTAMethod
from iopfl.models.routing import load_expert


class _Mean(nn.Module):
    """Mean of the experts' probabilities ``[B, K, H, W]``, returned as log-probabilities so that the
    shared ``softmax`` in ``predict`` recovers the mean exactly (it sums to 1)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).softmax(dim=1) for m in self.models]).mean(dim=0)
        return probs.clamp_min(1e-12).log()


class Ensemble(TTAMethod):
    name = "ensemble"

    def make_model(self) -> nn.Module:
        return _Mean([load_expert(self.build, s, i) for i, s in enumerate(self.experts)])
