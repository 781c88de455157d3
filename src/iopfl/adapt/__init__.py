"""Outside personalization: test-time methods, one file each. Adding one = a file + one line below."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from iopfl.adapt.base import StateDict, TTAMethod
from iopfl.adapt.bn import BNAdapt
from iopfl.adapt.config import AdaptConfig
from iopfl.adapt.ensemble import Ensemble
from iopfl.adapt.global_ import GlobalModel
from iopfl.adapt.iopfl import IOPFLRouting
from iopfl.adapt.tent import Tent
from iopfl.errors import UserError

METHODS: dict[str, type[TTAMethod]] = {
    GlobalModel.name: GlobalModel,
    BNAdapt.name: BNAdapt,
    Tent.name: Tent,
    Ensemble.name: Ensemble,
    IOPFLRouting.name: IOPFLRouting,
}


def build_method(
    name: str,
    experts: Sequence[StateDict],
    build: Callable[[], nn.Module],
    config: AdaptConfig,
    device: torch.device = torch.device("cpu"),
) -> TTAMethod:
    if name not in METHODS:
        raise UserError(f"unknown adaptation method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name](experts, build, config, device)


__all__ = ["METHODS", "AdaptConfig", "TTAMethod", "build_method"]
