"""Federated strategies. Adding one = a new file with a ``Strategy`` subclass + one line below."""

from __future__ import annotations

from iopfl.errors import UserError
from iopfl.fl.base import ClientReply, Strategy, StrategyConfig
from iopfl.fl.fedavg import FedAvg
from iopfl.fl.iopfl import IOPFLInside

STRATEGIES: dict[str, type[Strategy]] = {
    FedAvg.name: FedAvg,
    IOPFLInside.name: IOPFLInside,
}


def build_strategy(name: str, config: StrategyConfig | None = None) -> Strategy:
    """The strategy registered under ``name`` (the ``fl.method`` config key)."""
    try:
        return STRATEGIES[name](config)
    except KeyError:
        raise UserError(f"fl.method: unknown method '{name}' (choose from {', '.join(STRATEGIES)})") from None


__all__ = ["STRATEGIES", "ClientReply", "Strategy", "StrategyConfig", "build_strategy"]
