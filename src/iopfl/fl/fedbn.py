"""FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization",
ICLR 2021).

As FedAvg, except that normalisation layers — found by module type, not by name — never leave the
client: their affine parameters and running statistics are personal state, the rest is sent and
averaged. Client k trains from θ^{t-1} with its own normalisation layers substituted (the global
model's on its first round). The reported model is personalised: shared weights + the site's
normalisation layers (the server's model has no meaningful normalisation layers of its own: they stay
θ^0's, so only ``models = ("personalized",)`` is reported).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from iopfl.fl.base import PartlyLocal
from iopfl.models.routing import NORM_TYPES


def norm_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys (parameters and buffers) of every normalisation layer in ``model``."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys |= {f"{name}.{k}" if name else k for k in module.state_dict()}
    return keys


class FedBN(PartlyLocal):
    name = "fedbn"

    def kept(self, model: nn.Module) -> Callable[[str], bool]:
        return norm_state_keys(model).__contains__
