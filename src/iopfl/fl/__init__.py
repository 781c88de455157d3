"""Federated strategies. Adding one = a new file with a ``Strategy`` subclass + one line below."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iopfl.errors import UserError
from iopfl.fl.apfl import APFL
from iopfl.fl.base import ClientReply, Strategy, StrategyParams
from iopfl.fl.centralized import Centralized
from iopfl.fl.ditto import Ditto
from iopfl.fl.fedavg import FedAvg
from iopfl.fl.fedavgft import FedAvgFT
from iopfl.fl.fedbn import FedBN
from iopfl.fl.fedper import FedPer
from iopfl.fl.fedprox import FedProx
from iopfl.fl.fedrep import FedRep
from iopfl.fl.iopfl import IOPFLInside
from iopfl.fl.local import Local
from iopfl.fl.silobn import SiloBN

STRATEGIES: dict[str, type[Strategy]] = {
    Local.name: Local,
    Centralized.name: Centralized,
    FedAvg.name: FedAvg,
    FedAvgFT.name: FedAvgFT,
    FedProx.name: FedProx,
    FedBN.name: FedBN,
    SiloBN.name: SiloBN,
    Ditto.name: Ditto,
    FedRep.name: FedRep,
    FedPer.name: FedPer,
    APFL.name: APFL,
    IOPFLInside.name: IOPFLInside,
}


def build_strategy(name: str, params: StrategyParams | Mapping[str, Any] | None = None) -> Strategy:
    """The strategy registered under ``name`` (the ``fl.method`` config key) with its parameters."""
    if name not in STRATEGIES:
        raise UserError(f"fl.method: unknown method '{name}' (choose from {', '.join(STRATEGIES)})")
    return STRATEGIES[name](params)


__all__ = ["STRATEGIES", "ClientReply", "Strategy", "StrategyParams", "build_strategy"]
