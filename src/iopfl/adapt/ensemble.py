"""``ensemble``: the mean softmax of the E experts (global and every personalised model), each in
eval mode with its own running statistics; no adaptation."""

import torch
from torch import nn

from iopfl.adapt.base import TTAMethod
from iopfl.models.routing import load_expert


class _Mean(nn.Module):
    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # averaging probabilities, returned as log-probabilities so softmax() recovers the mean
        probs = torch.stack([m(x).softmax(dim=1) for m in self.models]).mean(dim=0)
        return probs.clamp_min(1e-12).log()


class Ensemble(TTAMethod):
    needs_personal = True
    name = "ensemble"

    def make_model(self) -> nn.Module:
        return _Mean([load_expert(self.build, s, i) for i, s in enumerate(self.experts)])
