"""``bn``: BN-adapt (Schneider et al., NeurIPS 2020; Nado et al., 2020) — normalise with the test
batch's statistics instead of the training running averages; no gradient steps. Batches smaller
than ``adapt.min_batch_stats`` normalise with the stream's statistics (``StreamBatchNorm2d``)."""

from torch import nn

from iopfl.adapt.base import TTAMethod


class BNAdapt(TTAMethod):
    name = "bn"

    def make_model(self) -> nn.Module:
        return self.bn_adapted_global()
