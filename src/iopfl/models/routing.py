"""Routed convolutions: mix E frozen expert kernels per sample (IOP-FL outside personalization).

Jiang et al., "IOP-FL: Inside-Outside Personalization for Federated Medical Image Segmentation",
IEEE TMI 42(7), 2023 — DESIGN §2.2. For a sample whose input to layer l is h, the gates are

    r = sigmoid(MLP(GAP(h))) ∈ (0, 1)^E,   MLP = Linear(C_in, 2·C_in) → Dropout(0.2) → Linear(2·C_in, E),

optionally divided by their sum (``gate_norm="sum"``), and the layer applies W̃ = Σ_e r_e·W^e
(bias likewise). All samples go through ONE grouped convolution: the batch is folded into the channel
axis and each sample's kernel becomes one group, so the cost is one convolution call rather than a
Python loop over samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from iopfl.errors import UserError

GateNorm = Literal["sigmoid", "sum"]
GATE_NORMS: tuple[str, ...] = ("sigmoid", "sum")
StateDict = Mapping[str, torch.Tensor]
# every normalisation layer whose affine parameters are adapted (BatchNorm, InstanceNorm, GroupNorm, LayerNorm)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class Router(nn.Module):
    """Per-sample gates ``[B, E]`` from a layer input ``[B, C, H, W]``.

    The gates of the last forward are kept (detached) in ``last_gates`` for logging and tests.
    """

    def __init__(self, in_channels: int, experts: int, gate_norm: GateNorm = "sigmoid"):
        super().__init__()
        if gate_norm not in GATE_NORMS:
            raise UserError(f"adapt.gate_norm: expected one of {', '.join(GATE_NORMS)}, got '{gate_norm}'")
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
    """Stacked expert kernels ``weight [E, *kernel]`` and biases ``bias [E, C_out]`` or None, as
    frozen buffers (they never appear in ``parameters()``, so no optimiser can touch them)."""

    def __init__(self, convs: Sequence[nn.Module], gate_norm: GateNorm):
        super().__init__()
        if not convs:
            raise ValueError("a routed layer needs at least one expert")
        first = convs[0]
        shapes = {tuple(c.weight.shape) for c in convs}
        if len(shapes) > 1 or len({c.bias is None for c in convs}) > 1:
            raise UserError(f"experts disagree on a layer's kernel shape or bias: {sorted(shapes)}")
        self.register_buffer("weight", torch.stack([c.weight.detach() for c in convs]).clone())
        bias = None if first.bias is None else torch.stack([c.bias.detach() for c in convs]).clone()
        self.register_buffer("bias", bias)
        self.in_channels, self.out_channels = first.in_channels, first.out_channels
        self.kernel_size, self.stride, self.padding = first.kernel_size, first.stride, first.padding
        self.dilation, self.groups = first.dilation, first.groups
        self.router = Router(first.in_channels, len(convs), gate_norm)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def last_gates(self) -> torch.Tensor | None:
        """Gates ``[B, E]`` of the last forward (detached)."""
        return self.router.last_gates

    def mixed(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample kernels ``[B, *kernel]`` and biases ``[B, C_out]`` from gates ``[B, E]``.

        One matmul over the flattened kernels mixes all samples at once.
        """
        e = self.num_experts
        w = (gates @ self.weight.reshape(e, -1)).reshape(gates.shape[0], *self.weight.shape[1:])
        b = None if self.bias is None else gates @ self.bias
        return w, b

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, experts={self.num_experts}, bias={self.bias is not None}")


class RoutedConv2d(_RoutedBase):
    """Routed ``nn.Conv2d`` over E experts: input ``[B, C_in, H, W]`` → ``[B, C_out, H', W']``.

    Args:
        convs: the E experts' layers (same hyper-parameters); their kernels are copied.
        gate_norm: ``"sigmoid"`` (raw gates) or ``"sum"`` (gates divided by their sum).
    """

    def __init__(self, convs: Sequence[nn.Conv2d], gate_norm: GateNorm = "sigmoid"):
        super().__init__(convs, gate_norm)
        self.padding_mode = convs[0].padding_mode
        # non-zero padding modes pad explicitly first, as nn.Conv2d does
        self._explicit_pad = tuple(convs[0]._reversed_padding_repeated_twice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        weight, bias = self.mixed(self.router(x))
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_pad, mode=self.padding_mode)
            h, w, padding = x.shape[2], x.shape[3], 0
        # batch folded into channels: sample i's kernels are groups i*groups ... (i+1)*groups-1
        out = F.conv2d(x.reshape(1, -1, h, w), weight.reshape(-1, *weight.shape[2:]),
                       None if bias is None else bias.reshape(-1), self.stride, padding,
                       self.dilation, self.groups * b)
        return out.reshape(b, self.out_channels, *out.shape[2:])


class RoutedConvTranspose2d(_RoutedBase):
    """Routed ``nn.ConvTranspose2d``: ``[B, C_in, H, W]`` → ``[B, C_out, H', W']``.

    Kernel layout is ``[C_in, C_out/groups, k, k]``, so folding the batch stacks per-sample kernels
    along the *input* axis: ``[B*C_in, C_out/groups, k, k]`` with ``B*groups`` groups.
    """

    def __init__(self, convs: Sequence[nn.ConvTranspose2d], gate_norm: GateNorm = "sigmoid"):
        super().__init__(convs, gate_norm)
        self.output_padding = convs[0].output_padding

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None:
            raise NotImplementedError("routed transposed convolutions take no output_size")
        b, _, h, w = x.shape
        weight, bias = self.mixed(self.router(x))
        out = F.conv_transpose2d(x.reshape(1, -1, h, w), weight.reshape(-1, *weight.shape[2:]),
                                 None if bias is None else bias.reshape(-1), self.stride, self.padding,
                                 self.output_padding, self.groups * b, self.dilation)
        return out.reshape(b, self.out_channels, *out.shape[2:])


ROUTED_TYPES = (RoutedConv2d, RoutedConvTranspose2d)


def check_state_dict(state: StateDict, reference: StateDict, index: int, label: str | None = None) -> None:
    """UserError naming the weights (``label``, default "expert ``index``") and the first offending keys
    when ``state`` does not have exactly the keys and shapes of ``reference`` (the architecture's own)."""
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in reference.items()
             if k in state and isinstance(v, torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{kind}: {', '.join(items[:3])}{', …' if len(items) > 3 else ''}"
                for kind, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatch", wrong)) if items]
    if problems:
        if label is None:
            label = f"expert {index} ({'the global model' if index == 0 else f'personalised model {index}'})"
        raise UserError(f"{label} does not match the architecture — " + "; ".join(problems))


def load_expert(build: Callable[[], nn.Module], state: StateDict, index: int = 0,
                label: str | None = None) -> nn.Module:
    """``build()`` with ``state`` loaded (copied); a mismatch is a UserError naming the expert
    (or ``label``, e.g. "SiteA's personalised model")."""
    model = build()
    check_state_dict(state, model.state_dict(), index, label)
    model.load_state_dict(state, strict=True)
    return model


def use_batch_statistics(model: nn.Module) -> None:
    """Normalisation layers use the current batch's statistics, in train and eval mode alike.

    Dropping the running buffers (rather than relying on train mode) keeps ``model.eval()`` free to
    switch dropout off for prediction without switching back to the source statistics.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def route_experts(state_dicts: Sequence[StateDict], build: Callable[[], nn.Module],
                  gate_norm: GateNorm = "sigmoid") -> nn.Module:
    """One routed network from E same-architecture state dicts; ``state_dicts[0]`` is the global model.

    Every ``nn.Conv2d`` / ``nn.ConvTranspose2d`` of ``build()`` (found by type, any module tree)
    becomes its routed version over the E experts' kernels. Everything else — normalisation layers
    included — comes from the global expert. Normalisation uses batch statistics; the trainable set
    is every router plus the normalisation affine parameters, all else is frozen.

    Raises:
        UserError: fewer than two experts, or a state dict whose keys or shapes differ from ``build()``.
    """
    if len(state_dicts) < 2:
        raise UserError(f"routing needs the global model and at least one personalised model, got "
                        f"{len(state_dicts)} expert(s) — train with a method that keeps personalised models")
    experts = [load_expert(build, s, i) for i, s in enumerate(state_dicts)]
    routed = experts[0]
    replaced: dict[int, nn.Module] = {}  # a layer registered under several names is routed once
    for name, module in list(routed.named_modules(remove_duplicate=False)):
        if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            continue
        if id(module) not in replaced:
            layers = [e.get_submodule(name) for e in experts]
            cls = RoutedConvTranspose2d if isinstance(module, nn.ConvTranspose2d) else RoutedConv2d
            replaced[id(module)] = cls(layers, gate_norm)
        _set_submodule(routed, name, replaced[id(module)])
    use_batch_statistics(routed)
    routed.requires_grad_(False)
    for p in [*routing_parameters(routed), *norm_affine_parameters(routed)]:
        p.requires_grad_(True)
    return routed


def routers(model: nn.Module) -> list[Router]:
    """Every layer's router, in module order."""
    return [m for m in model.modules() if isinstance(m, Router)]


def routed_layers(model: nn.Module) -> list[_RoutedBase]:
    """Every routed (transposed) convolution, in module order."""
    return [m for m in model.modules() if isinstance(m, ROUTED_TYPES)]


def routing_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every routing MLP."""
    return [p for r in routers(model) for p in r.parameters()]


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Affine γ, β of every normalisation layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm)."""
    return [p for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)]
