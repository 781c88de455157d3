"""SiloBN (Andreux et al., "Siloed Federated Learning for Multi-Centric Histopathology Datasets",
MICCAI DCL workshop 2020).

As FedBN, but only the normalisation layers' *statistics* stay local: every BatchNorm's running mean
and variance (and its batch counter) never leave the client, while its affine parameters γ, β are
sent and averaged with the rest. Client k trains from θ^{t-1} with its own running statistics
substituted (the global model's on its first round). The reported model is personalised: shared
weights + the site's statistics (the server's statistics stay θ^0's, so only
``models = ("personalized",)`` is reported).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from iopfl.fl.base import PartlyLocal
from iopfl.models.routing import NORM_TYPES


def norm_statistic_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every normalisation layer's buffers (running statistics, batch counter),
    found by module type; their affine parameters are not among them."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys |= {f"{name}.{k}" if name else k for k, _ in module.named_buffers(recurse=False)}
    return keys


class SiloBN(PartlyLocal):
    name = "silobn"

    def kept(self, model: nn.Module) -> Callable[[str], bool]:
        return norm_statistic_keys(model).__contains__
