"""The network a run trains, built from its description, and the type its weights travel in."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from iopfl.models.unet import UNet, build_model

StateDict = dict[str, torch.Tensor]  # a model's parameters and buffers by name (deep copies on the CPU)


def network_builder(network: Mapping[str, Any]) -> Callable[[], UNet]:
    """A factory for the U-Net a network description names (``in_channels``, ``num_classes``,
    ``width``, ``depth``: what a run's checkpoint records)."""
    n = dict(network)
    return lambda: build_model(n["in_channels"], n["num_classes"], n["width"], n["depth"])
