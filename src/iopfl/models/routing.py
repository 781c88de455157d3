"""Routed convolutions: mix E frozen expert kernels per sample (IOP-FL outside personalization).

For a sample whose input to layer l is h, the gates are r = sigmoid(MLP(GAP(h))) ∈ (0, 1)^E with
MLP = Linear(C_in, 2·C_in) → Dropout(0.2) → Linear(2·C_in, E), optionally divided by their sum; the
layer applies W̃ = Σ_e r_e·W^e (bias likewise). All samples go through ONE grouped convolution: the
batch is folded into the channel axis and each sample's kernel becomes one group, so the cost is a
single convolution call rather than a Python loop over samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from iopfl.errors import UserError

GateNorm = Literal["sigmoid", "sum"]
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class Router(nn.Module):
    """Per-sample gates ``[B, E]`` from a layer input ``[B, C, H, W]``."""

    def __init__(self, in_channels: int, experts: int, gate_norm: GateNorm = "sigmoid"):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, 2 * in_channels), nn.Dropout(0.2),
                                 nn.Linear(2 * in_channels, experts))
        self.gate_norm = gate_norm
        self.last_gates: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))))
        if self.gate_norm == "sum":
            gates = gates / gates.sum(dim=1, keepdim=True)
        self.last_gates = gates.detach()
        return gates


class _RoutedBase(nn.Module):
    """Holds the stacked expert kernels ``[E, *kernel]`` and biases ``[E, C_out]`` (frozen buffers)."""

    def __init__(self, convs: Sequence[nn.Module], gate_norm: GateNorm):
        super().__init__()
        first = convs[0]
        self.register_buffer("weight", torch.stack([c.weight.detach() for c in convs]))
        bias = None if first.bias is None else torch.stack([c.bias.detach() for c in convs])
        self.register_buffer("bias", bias)
        self.stride, self.padding, self.dilation, self.groups = first.stride, first.padding, first.dilation, first.groups
        self.router = Router(first.in_channels, len(convs), gate_norm)
        self.in_channels, self.out_channels = first.in_channels, first.out_channels

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def mixed(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample kernels ``[B, *kernel]`` and biases ``[B, C_out]`` (one matmul each)."""
        e = self.num_experts
        w = (gates @ self.weight.reshape(e, -1)).reshape(gates.shape[0], *self.weight.shape[1:])
        b = None if self.bias is None else gates @ self.bias
        return w, b


class RoutedConv2d(_RoutedBase):
    """Routed ``nn.Conv2d``: input ``[B, C_in, H, W]`` → ``[B, C_out, H', W']``."""

    def __init__(self, convs: Sequence[nn.Conv2d], gate_norm: GateNorm = "sigmoid"):
        super().__init__(convs, gate_norm)
        if convs[0].padding_mode != "zeros":
            raise UserError("routing supports zero-padded convolutions only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        weight, bias = self.mixed(self.router(x))
        out = F.conv2d(x.reshape(1, -1, h, w), weight.reshape(-1, *weight.shape[2:]),
                       None if bias is None else bias.reshape(-1), self.stride, self.padding,
                       self.dilation, self.groups * b)
        return out.reshape(b, self.out_channels, *out.shape[2:])


class RoutedConvTranspose2d(_RoutedBase):
    """Routed ``nn.ConvTranspose2d`` (kernel layout ``[C_in, C_out/groups, k, k]``)."""

    def __init__(self, convs: Sequence[nn.ConvTranspose2d], gate_norm: GateNorm = "sigmoid"):
        super().__init__(convs, gate_norm)
        self.output_padding = convs[0].output_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        weight, bias = self.mixed(self.router(x))
        out = F.conv_transpose2d(x.reshape(1, -1, h, w), weight.reshape(-1, *weight.shape[2:]),
                                 None if bias is None else bias.reshape(-1), self.stride, self.padding,
                                 self.output_padding, self.groups * b, self.dilation)
        return out.reshape(b, self.out_channels, *out.shape[2:])


def load_expert(build: Callable[[], nn.Module], state: dict[str, torch.Tensor], index: int) -> nn.Module:
    """``build()`` with ``state`` loaded; a mismatch is a UserError naming the expert."""
    model = build()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"expert {index} does not match the architecture ({first})") from None
    return model


def use_batch_statistics(model: nn.Module) -> None:
    """BatchNorm layers normalise with the current batch's statistics, in train and eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None


def route_experts(states: Sequence[dict[str, torch.Tensor]], build: Callable[[], nn.Module],
                  gate_norm: GateNorm = "sigmoid") -> nn.Module:
    """One routed network from E same-architecture state dicts; ``states[0]`` is the global expert.

    Every Conv2d / ConvTranspose2d becomes its routed version over the E experts; everything else
    (normalisation layers included) comes from the global expert. Normalisation uses batch statistics
    and only its affine parameters and the routers are trainable.
    """
    if len(states) < 2:
        raise UserError("routing needs at least two experts (the global model and one personalised model)")
    experts = [load_expert(build, s, i) for i, s in enumerate(states)]
    routed = experts[0]
    for name, module in list(routed.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            layers = [e.get_submodule(name) for e in experts]
            cls = RoutedConvTranspose2d if isinstance(module, nn.ConvTranspose2d) else RoutedConv2d
            parent, _, child = name.rpartition(".")
            setattr(routed.get_submodule(parent) if parent else routed, child, cls(layers, gate_norm))
    use_batch_statistics(routed)
    for p in routed.parameters():
        p.requires_grad_(False)
    for p in [*routing_parameters(routed), *norm_affine_parameters(routed)]:
        p.requires_grad_(True)
    return routed


def routers(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


def routing_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for r in routers(model) for p in r.parameters()]


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)]
