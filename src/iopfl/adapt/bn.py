"""``bn``: BN-adapt (Schneider et al., "Improving robustness against common corruptions by covariate
shift adaptation", NeurIPS 2020; Nado et al., arXiv:2006.10963, 2020).

Update rule: no gradient step. Every normalisation layer of the global model normalises with the
mean and variance of the current test batch instead of the training running averages; the affine
parameters are kept.
"""

from torch import nn

from iopfl.adapt.base import TTAMethod
from iopfl.models.routing import use_batch_statistics


class BNAdapt(TTAMethod):
    name = "bn"

    def make_model(self) -> nn.Module:
        model = super().make_model()
        use_batch_statistics(model)
        return model
