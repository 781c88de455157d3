"""Routed convolutions against a naive per-sample computation; expert reproduction; gradients; errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iopfl.adapt import AdaptConfig, build_method
from iopfl.errors import UserError
from iopfl.models import UNet
from iopfl.models.routing import (
    RoutedConv2d,
    RoutedConvTranspose2d,
    Router,
    norm_affine_parameters,
    route_experts,
    routed_layers,
    routers,
    routing_parameters,
)


@pytest.fixture()
def float64():
    """Exact comparisons in float64, restored afterwards so no other test runs in float64."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _naive(layer, x, gates):
    """The per-sample reference: W̃ = Σ_e r_e W^e built for each sample, one F.conv call per sample."""
    outs = []
    for i in range(x.shape[0]):
        w = sum(gates[i, e] * layer.weight[e] for e in range(layer.num_experts))
        b = None if layer.bias is None else sum(gates[i, e] * layer.bias[e] for e in range(layer.num_experts))
        xi = x[i : i + 1]
        if isinstance(layer, RoutedConvTranspose2d):
            outs.append(F.conv_transpose2d(xi, w, b, layer.stride, layer.padding, layer.output_padding,
                                           layer.groups, layer.dilation))
        else:
            padding = layer.padding
            if layer.padding_mode != "zeros":
                xi, padding = F.pad(xi, layer._explicit_pad, mode=layer.padding_mode), 0
            outs.append(F.conv2d(xi, w, b, layer.stride, padding, layer.dilation, layer.groups))
    return torch.cat(outs)


CONV_CASES = [
    dict(kernel_size=3, stride=1, padding=1, bias=True),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=3, stride=2, padding=1, bias=True),
    dict(kernel_size=5, stride=2, padding=2, bias=True, groups=2),
    dict(kernel_size=3, stride=1, padding=2, bias=False, dilation=2, groups=2),
    dict(kernel_size=1, stride=1, padding=0, bias=True),
    dict(kernel_size=3, stride=1, padding="same", bias=True),
    dict(kernel_size=3, stride=2, padding=1, bias=True, padding_mode="reflect"),
    dict(kernel_size=3, stride=1, padding=1, bias=False, padding_mode="circular", groups=2),
]


@pytest.mark.parametrize("kw", CONV_CASES)
@pytest.mark.parametrize("gate_norm", ["sigmoid", "sum"])
def test_routed_conv_equals_per_sample_loop(float64, kw, gate_norm):
    torch.manual_seed(0)
    layer = RoutedConv2d([nn.Conv2d(4, 6, **kw) for _ in range(3)], gate_norm)
    x = torch.randn(5, 4, 11, 9)  # odd sizes
    out = layer(x)
    assert out.shape == nn.Conv2d(4, 6, **kw)(x).shape
    torch.testing.assert_close(out, _naive(layer, x, layer.last_gates), atol=1e-10, rtol=0)


TRANSPOSED_CASES = [
    dict(kernel_size=2, stride=2, padding=0, bias=True),
    dict(kernel_size=3, stride=2, padding=1, output_padding=1, bias=False),
    dict(kernel_size=3, stride=2, padding=1, output_padding=1, bias=True, groups=2),
    dict(kernel_size=4, stride=2, padding=1, bias=False, groups=2),
    dict(kernel_size=3, stride=2, padding=1, output_padding=1, bias=True, dilation=2),
]


@pytest.mark.parametrize("kw", TRANSPOSED_CASES)
@pytest.mark.parametrize("gate_norm", ["sigmoid", "sum"])
def test_routed_transposed_conv_equals_per_sample_loop(float64, kw, gate_norm):
    torch.manual_seed(1)
    layer = RoutedConvTranspose2d([nn.ConvTranspose2d(4, 6, **kw) for _ in range(4)], gate_norm)
    x = torch.randn(3, 4, 7, 5)
    out = layer(x)
    assert out.shape == nn.ConvTranspose2d(4, 6, **kw)(x).shape
    torch.testing.assert_close(out, _naive(layer, x, layer.last_gates), atol=1e-10, rtol=0)


def test_float32_agrees_with_the_loop_too():
    torch.manual_seed(2)
    conv = RoutedConv2d([nn.Conv2d(8, 8, 3, stride=2, padding=1) for _ in range(6)])
    up = RoutedConvTranspose2d([nn.ConvTranspose2d(8, 4, 2, stride=2) for _ in range(6)])
    x = torch.randn(4, 8, 13, 13)
    torch.testing.assert_close(conv(x), _naive(conv, x, conv.last_gates), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(up(x), _naive(up, x, up.last_gates), atol=1e-5, rtol=1e-5)


def test_gates_are_kept_and_normalised():
    torch.manual_seed(0)
    layer = RoutedConv2d([nn.Conv2d(3, 2, 3) for _ in range(4)], "sum")
    layer(torch.randn(5, 3, 8, 8))
    assert layer.last_gates.shape == (5, 4) and not layer.last_gates.requires_grad
    torch.testing.assert_close(layer.last_gates.sum(1), torch.ones(5))
    raw = RoutedConv2d([nn.Conv2d(3, 2, 3) for _ in range(4)])
    raw(torch.randn(5, 3, 8, 8))
    assert ((raw.last_gates > 0) & (raw.last_gates < 1)).all()


def test_one_batched_convolution_per_layer(monkeypatch):
    """No loop over samples: each routed layer makes exactly one convolution call for the batch."""
    build, states = _experts(3)
    routed = route_experts(states, build)
    calls = {"conv2d": 0, "conv_transpose2d": 0}
    for fn in calls:
        original = getattr(F, fn)

        def counting(*a, _fn=fn, _orig=original, **k):
            calls[_fn] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(F, fn, counting)
    routed(torch.randn(6, 3, 16, 16))
    layers = routed_layers(routed)
    assert calls["conv2d"] == sum(isinstance(m, RoutedConv2d) for m in layers)
    assert calls["conv_transpose2d"] == sum(isinstance(m, RoutedConvTranspose2d) for m in layers)


def _experts(n, seed=0, build=None):
    """n state dicts with different kernels and biases but the global model's normalisation affine, so
    that a routed model — whose normalisation comes from expert 0 — can reproduce every expert."""
    torch.manual_seed(seed)
    build = build or (lambda: UNet(3, 2, width=4, depth=2))
    states = []
    for _ in range(n):
        m = build()
        for norm in (x for x in m.modules() if isinstance(x, (nn.BatchNorm2d, nn.GroupNorm))):
            norm.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
            norm.bias.data.normal_(generator=torch.Generator().manual_seed(seed + 1))
        m.train()
        with torch.no_grad():  # distinct running statistics, as trained experts would have
            m(torch.randn(4, 3, 16, 16) * (1 + len(states)))
        states.append(m.state_dict())
    return build, states


def _force_one_hot(monkeypatch, e, n):
    def one_hot(self, h):
        gates = F.one_hot(torch.full((h.shape[0],), e), n).to(h.dtype)
        self.last_gates = gates
        return gates

    monkeypatch.setattr(Router, "forward", one_hot)


@pytest.mark.parametrize("gate_norm", ["sigmoid", "sum"])
def test_one_hot_gates_reproduce_each_expert(monkeypatch, float64, gate_norm):
    build, states = _experts(3)
    routed = route_experts(states, build, gate_norm)
    x = torch.randn(4, 3, 16, 16)
    for e in range(3):
        _force_one_hot(monkeypatch, e, 3)
        expert = build()
        expert.load_state_dict(states[e])
        expert.train()  # train-mode BN: batch statistics, like the routed model
        routed.train()
        torch.testing.assert_close(routed(x), expert(x), atol=1e-10, rtol=0, msg=f"expert {e}")


class _AnyTree(nn.Module):
    """Not our U-Net: nested containers, grouped and dilated convolutions, GroupNorm, a transposed conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.body = nn.ModuleDict({"mid": nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=4)})
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(self.body["mid"](self.stem(x)))))


def test_any_module_tree_is_routed(monkeypatch, float64):
    build, states = _experts(3, build=_AnyTree)
    routed = route_experts(states, build)
    assert len(routed_layers(routed)) == 4
    assert not any(type(m) in (nn.Conv2d, nn.ConvTranspose2d) for m in routed.modules())
    x = torch.randn(3, 3, 10, 10)
    for e in range(3):
        _force_one_hot(monkeypatch, e, 3)
        expert = build()
        expert.load_state_dict(states[e])
        torch.testing.assert_close(routed(x), expert(x), atol=1e-10, rtol=0)


def test_trainable_set_and_batch_statistics():
    build, states = _experts(3)
    routed = route_experts(states, build)
    trainable = {id(p) for p in routed.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in routing_parameters(routed) + norm_affine_parameters(routed)}
    assert len(routers(routed)) == sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in build().modules())
    for bn in (m for m in routed.modules() if isinstance(m, nn.BatchNorm2d)):
        assert not bn.track_running_stats and bn.running_mean is None
    # the normalisation affine comes from the global expert
    assert torch.equal(routed.encoders[0][1].weight, states[0]["encoders.0.1.weight"])
    # the experts' kernels are copies: changing a state dict afterwards changes nothing
    before = routed.head.weight.clone()
    states[1]["head.weight"].add_(1.0)
    assert torch.equal(routed.head.weight, before)


def test_iopfl_loss_reaches_every_router_and_no_expert_kernel():
    build, states = _experts(3)
    method = build_method("iopfl", states, build, AdaptConfig())
    routed = method.make_model()
    routed.train()
    loss = method.loss(routed, torch.randn(4, 3, 16, 16), torch.Generator().manual_seed(0))
    loss.backward()
    for r in routers(routed):
        for p in r.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None for p in norm_affine_parameters(routed))
    for layer in routed_layers(routed):
        assert not layer.weight.requires_grad and layer.weight.grad is None
        assert layer.bias is None or (not layer.bias.requires_grad and layer.bias.grad is None)
    assert all(p.grad is None for p in routed.parameters() if not p.requires_grad)


@pytest.mark.parametrize("problem", ["width", "missing", "extra"])
def test_mismatched_experts_are_a_clear_error(problem):
    build, states = _experts(2)
    other = dict(states[1])
    if problem == "width":
        other = UNet(3, 2, width=8, depth=2).state_dict()
        expected = "shape mismatch: encoders.0.0.weight"
    elif problem == "missing":
        del other["head.bias"]
        expected = "missing keys: head.bias"
    else:
        other["extra.weight"] = torch.zeros(1)
        expected = "unexpected keys: extra.weight"
    with pytest.raises(UserError, match="expert 1") as err:
        route_experts([states[0], other], build)
    assert expected in str(err.value)


def test_a_single_expert_is_a_clear_error():
    build, states = _experts(1)
    with pytest.raises(UserError, match="at least one personalised model"):
        route_experts(states, build)
