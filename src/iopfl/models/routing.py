"""Routed convolutions: mix E frozen expert kernels per sample (IOP-FL outside personalization).

For a sample whose input to layer l is h, the router's logits are z = MLP(GAP(h)) with
MLP = Linear(C_in, 2·C_in) → Dropout(0.2) → Linear(2·C_in, E), and the layer applies W̃ = Σ_e r_e·W^e
(bias likewise) with gates r from z by ``gate_norm``:

- ``softmax``: r = softmax(z), on the simplex — W̃ always lies in the convex hull of the experts'
  kernels, a mixture of them, never a rescaling (docs/METHOD.md, "Outside safety");
- ``sigmoid`` (the paper): r = sigmoid(z) ∈ (0, 1)^E — Σ_e r_e is free, so the kernel's scale is too;
- ``sum``: sigmoid(z) divided by its sum — on the simplex as well.
 The routers start from PyTorch's default
initialisation (``paper``: every gate ≈ 0.5, so W̃ ≈ ½·Σ_e W^e), from the global expert (``global``)
or from the experts' mean (``uniform``); see :func:`init_gates`. All samples go through ONE grouped
convolution: the batch is folded into the channel axis and each sample's kernel becomes one group, so
the cost is a single convolution call rather than a Python loop over samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from iopfl.errors import UserError
from iopfl.models.stream_norm import StreamBatchNorm2d

GateNorm = Literal["softmax", "sigmoid", "sum"]
GateInit = Literal["paper", "global", "uniform"]
# ``global`` start: gate_0 = 1 − ε and every other gate ε. Exact 0/1 would need an infinite logit.
# ε = 1e-6 (logit ±13.8) keeps the routed network's softmax within 1e-5 of the global expert's
# (ε = 1e-5 left 5e-5 with three experts), and the router stays trainable: sigmoid′ ≈ ε scales the
# gradients, but Adam's steps do not depend on the gradient's size while it is well above Adam's ε (1e-8).
GLOBAL_GATE_EPS = 1e-6
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class Router(nn.Module):
    """Per-sample gates ``[B, E]`` from a layer input ``[B, C, H, W]``."""

    def __init__(self, in_channels: int, experts: int, gate_norm: GateNorm = "sigmoid", gate_init: GateInit = "paper"):
        super().__init__()
        # created in this order: their default inits draw from the RNG in it (the routers' starting point)
        hidden, last = nn.Linear(in_channels, 2 * in_channels), nn.Linear(2 * in_channels, experts)
        self.mlp = nn.Sequential(hidden, nn.Dropout(0.2), last)
        self.gate_norm = gate_norm
        init_gates(last, gate_init, gate_norm)
        self.last_gates: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.mlp(x.mean(dim=(2, 3)))
        if self.gate_norm == "softmax":
            gates = logits.softmax(dim=1)
        else:
            gates = torch.sigmoid(logits)
            if self.gate_norm == "sum":
                gates = gates / gates.sum(dim=1, keepdim=True)
        self.last_gates = gates.detach()
        return gates


def init_gates(last: nn.Linear, gate_init: GateInit, gate_norm: GateNorm) -> None:
    """Start the router's last layer ``Linear(2C, E)`` so that every sample's gates are fixed.

    ``paper`` keeps PyTorch's default initialisation (the published code). Otherwise the weights are
    zero, so the gates do not depend on the input at step 0 (the first layer then gets no gradient
    until the last one has moved, which happens at the first step), and the bias sets them:
    ``global`` → the global expert's gate 1 − ε and every other ε·(something ≤ 1), ε =
    ``GLOBAL_GATE_EPS`` (the routed network is the global expert); ``uniform`` → 1/E each (the
    experts' mean): logit log(1/(E − 1)) for raw sigmoid gates, any equal logit (0) when the gates are
    normalised (softmax, or divided by their sum).
    """
    if gate_init == "paper":
        return
    experts = last.out_features
    with torch.no_grad():
        last.weight.zero_()
        if gate_init == "global" and gate_norm == "softmax":
            # softmax gate of expert 0 = e^z / (e^z + E − 1) = 1 − ε, the others' logits 0
            last.bias.zero_()
            last.bias[0] = math.log((1 - GLOBAL_GATE_EPS) * (experts - 1) / GLOBAL_GATE_EPS)
        elif gate_init == "global":
            logit = math.log((1 - GLOBAL_GATE_EPS) / GLOBAL_GATE_EPS)
            last.bias.fill_(-logit)
            last.bias[0] = logit
        else:
            last.bias.fill_(0.0 if gate_norm != "sigmoid" else math.log(1 / (experts - 1)))


class _RoutedBase(nn.Module):
    """Holds the stacked expert kernels ``[E, *kernel]`` and biases ``[E, C_out]`` (frozen buffers)."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, convs: Sequence[nn.Conv2d] | Sequence[nn.ConvTranspose2d], gate_norm: GateNorm, gate_init: GateInit
    ):
        super().__init__()
        first = convs[0]
        self.register_buffer("weight", torch.stack([c.weight.detach() for c in convs]))
        bias = None if first.bias is None else torch.stack([c.bias.detach() for c in convs if c.bias is not None])
        self.register_buffer("bias", bias)
        self.stride, self.padding = first.stride, first.padding
        self.dilation, self.groups = first.dilation, first.groups
        self.router = Router(first.in_channels, len(convs), gate_norm, gate_init)
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

    def __init__(self, convs: Sequence[nn.Conv2d], gate_norm: GateNorm = "sigmoid", gate_init: GateInit = "paper"):
        super().__init__(convs, gate_norm, gate_init)
        if convs[0].padding_mode != "zeros":
            raise UserError("routing supports zero-padded convolutions only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        weight, bias = self.mixed(self.router(x))
        out = F.conv2d(
            x.reshape(1, -1, h, w),
            weight.reshape(-1, *weight.shape[2:]),
            None if bias is None else bias.reshape(-1),
            self.stride,
            self.padding,
            self.dilation,
            self.groups * b,
        )
        return out.reshape(b, self.out_channels, *out.shape[2:])


class RoutedConvTranspose2d(_RoutedBase):
    """Routed ``nn.ConvTranspose2d`` (kernel layout ``[C_in, C_out/groups, k, k]``)."""

    def __init__(
        self, convs: Sequence[nn.ConvTranspose2d], gate_norm: GateNorm = "sigmoid", gate_init: GateInit = "paper"
    ):
        super().__init__(convs, gate_norm, gate_init)
        self.output_padding = convs[0].output_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        weight, bias = self.mixed(self.router(x))
        # a transposed convolution's padding is a tuple (torch types it with Conv2d's "same"/"valid")
        padding = cast(tuple[int, ...], self.padding)
        out = F.conv_transpose2d(
            x.reshape(1, -1, h, w),
            weight.reshape(-1, *weight.shape[2:]),
            None if bias is None else bias.reshape(-1),
            self.stride,
            padding,
            self.output_padding,
            self.groups * b,
            self.dilation,
        )
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


def use_batch_statistics(model: nn.Module, min_batch: int = 1) -> None:
    """BatchNorm2d layers normalise with the current batch's statistics, in train and eval mode;
    batches smaller than ``min_batch`` with the stream's (:class:`StreamBatchNorm2d`)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, StreamBatchNorm2d(m, min_batch))


def route_experts(
    states: Sequence[dict[str, torch.Tensor]],
    build: Callable[[], nn.Module],
    gate_norm: GateNorm = "sigmoid",
    gate_init: GateInit = "paper",
    min_batch_stats: int = 1,
) -> nn.Module:
    """One routed network from E same-architecture state dicts; ``states[0]`` is the global expert.

    Every Conv2d / ConvTranspose2d becomes its routed version over the E experts; everything else
    (normalisation layers included) comes from the global expert. Normalisation uses batch statistics
    (the stream's below ``min_batch_stats`` images) and only its affine parameters and the routers are
    trainable.
    """
    if len(states) < 2:
        raise UserError("routing needs at least two experts (the global model and one personalised model)")
    experts = [load_expert(build, s, i) for i, s in enumerate(states)]
    routed = experts[0]
    for name, module in list(routed.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            layers = [e.get_submodule(name) for e in experts]  # of module's class in every expert: one build()
            if isinstance(module, nn.ConvTranspose2d):
                layer: _RoutedBase = RoutedConvTranspose2d(cast(list[nn.ConvTranspose2d], layers), gate_norm, gate_init)
            else:
                layer = RoutedConv2d(cast(list[nn.Conv2d], layers), gate_norm, gate_init)
            parent, _, child = name.rpartition(".")
            setattr(routed.get_submodule(parent) if parent else routed, child, layer)
    use_batch_statistics(routed, min_batch_stats)
    for p in routed.parameters():
        p.requires_grad_(False)
    for p in [*routing_parameters(routed), *norm_affine_parameters(routed)]:
        p.requires_grad_(True)
    return routed


def routed_layers(model: nn.Module) -> list[tuple[str, Router]]:
    """(name of the routed convolution, its router) in module order."""
    return [(name, m.router) for name, m in model.named_modules() if isinstance(m, _RoutedBase)]


def last_gates(model: nn.Module) -> list[torch.Tensor]:
    """Each routed layer's gates ``[B, E]`` of the model's last forward, in module order."""
    gates = [router.last_gates for _, router in routed_layers(model)]
    if any(g is None for g in gates):
        raise RuntimeError("the routed model has not run a forward yet")
    return [g for g in gates if g is not None]


def routers(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


def routing_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for r in routers(model) for p in r.parameters()]


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)]
