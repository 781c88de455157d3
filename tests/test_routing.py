"""Routed convolutions against a naive per-sample computation; expert reproduction; gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iopfl.errors import UserError
from iopfl.models import UNet
from iopfl.models.routing import RoutedConv2d, RoutedConvTranspose2d, Router, route_experts, routers
from iopfl.models.stream_norm import StreamBatchNorm2d


@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons in float64, restored afterwards so no other test runs in float64."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _naive(layer, x, gates, transposed):
    outs = []
    for i in range(x.shape[0]):  # the per-sample reference the batched version must equal
        w = sum(gates[i, e] * layer.weight[e] for e in range(layer.num_experts))
        b = None if layer.bias is None else sum(gates[i, e] * layer.bias[e] for e in range(layer.num_experts))
        if transposed:
            outs.append(
                F.conv_transpose2d(
                    x[i : i + 1], w, b, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation
                )
            )
        else:
            outs.append(F.conv2d(x[i : i + 1], w, b, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=3, stride=1, padding=1, bias=True),
        dict(kernel_size=3, stride=2, padding=1, bias=False),
        dict(kernel_size=5, stride=2, padding=2, bias=True, groups=2, dilation=1),
        dict(kernel_size=3, stride=1, padding=2, bias=True, dilation=2),
        dict(kernel_size=1, stride=1, padding=0, bias=True),
    ],
)
@pytest.mark.parametrize("gate_norm", ["sigmoid", "sum"])
def test_routed_conv_equals_per_sample_loop(kw, gate_norm):
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, 6, **kw) for _ in range(3)]
    layer = RoutedConv2d(convs, gate_norm)
    x = torch.randn(5, 4, 11, 9)
    out = layer(x)
    assert torch.allclose(out, _naive(layer, x, layer.router.last_gates, False), atol=1e-10)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=2, stride=2, padding=0, bias=True),
        dict(kernel_size=3, stride=2, padding=1, output_padding=1, bias=False),
        dict(kernel_size=4, stride=2, padding=1, bias=True, groups=2),
    ],
)
def test_routed_transposed_conv_equals_per_sample_loop(kw):
    torch.manual_seed(1)
    convs = [nn.ConvTranspose2d(4, 6, **kw) for _ in range(4)]
    layer = RoutedConvTranspose2d(convs)
    x = torch.randn(3, 4, 7, 5)
    out = layer(x)
    assert torch.allclose(out, _naive(layer, x, layer.router.last_gates, True), atol=1e-10)


def _experts(n, seed=0):
    torch.manual_seed(seed)
    build = lambda: UNet(3, 2, width=4, depth=2)  # noqa: E731
    states = []
    for _ in range(n):
        m = build()
        for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_()
        states.append(m.state_dict())
    return build, states


def test_one_hot_gates_reproduce_each_expert(monkeypatch):
    build, states = _experts(3)
    routed = route_experts(states, build)
    x = torch.randn(2, 3, 16, 16)
    for e in range(3):

        def one_hot(self, h, e=e):
            return F.one_hot(torch.full((h.shape[0],), e), len(states)).to(h.dtype)

        monkeypatch.setattr(type(routers(routed)[0]), "forward", one_hot)
        expert = build()
        # normalisation layers come from the global expert, so compare with expert e's convolutions
        # around the global expert's normalisation layers
        mixed = {k: states[0][k] if _is_norm_key(expert, k) else v for k, v in states[e].items()}
        expert.load_state_dict(mixed)
        expert.train()
        routed.train()
        assert torch.allclose(routed(x), expert(x), atol=1e-8), f"expert {e}"


def _is_norm_key(model, key):
    module = model.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(module, nn.BatchNorm2d)


def test_every_router_gets_gradients_and_experts_none():
    build, states = _experts(3)
    routed = route_experts(states, build)
    out = routed(torch.randn(2, 3, 16, 16)).softmax(1)
    (-(out * out.log()).sum(1).mean()).backward()
    rs = routers(routed)
    assert len(rs) == sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in build().modules())
    for r in rs:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters())
    assert all(not b.requires_grad for name, b in routed.named_buffers() if name.endswith("weight"))


def test_mismatched_experts_are_a_clear_error():
    build, states = _experts(2)
    other = UNet(3, 2, width=8, depth=2).state_dict()
    with pytest.raises(UserError, match="expert 1"):
        route_experts([states[0], other], build)


@pytest.mark.parametrize("gate_norm", ["sigmoid", "sum"])
@pytest.mark.parametrize("experts", [2, 5])
def test_fixed_gate_inits(gate_norm, experts):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5)
    start = Router(6, experts, gate_norm, "global")(x)
    target = torch.zeros(4, experts)
    target[:, 0] = 1
    assert (start - target).abs().max() < 1e-5 * experts
    assert torch.allclose(
        Router(6, experts, gate_norm, "uniform")(x), torch.full((4, experts), 1 / experts), atol=1e-12
    )
    # the paper's start: every gate near ½ (sigmoid of small logits), not a mixture summing to 1
    if gate_norm == "sigmoid":
        paper = Router(6, experts, gate_norm, "paper")(x)
        assert ((paper - 0.5).abs() < 0.3).all() and not torch.allclose(paper, paper[:1])


def test_global_gate_init_trains():
    torch.manual_seed(0)
    router = Router(6, 3, "sigmoid", "global")
    gates = router(torch.randn(4, 6, 5, 5))
    gates[:, 1].sum().backward()  # a loss that wants expert 1
    last, first = router.mlp[-1], router.mlp[0]
    assert last.bias.grad[1] != 0 and last.weight.grad.abs().sum() > 0
    assert first.weight.grad.abs().sum() == 0  # zero last-layer weights: nothing reaches it at step 0


def _bn(channels=3, seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    return bn


def test_stream_norm_uses_batch_statistics_from_min_batch_on():
    bn = _bn()
    norm = StreamBatchNorm2d(bn, min_batch=4).eval()
    x = torch.randn(4, 3, 6, 6) * 3 + 1
    ref = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps)
    assert torch.allclose(norm(x), ref * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1), atol=1e-10)


def _pool(mean, var, n, x):
    """Naive pooled statistics of (mean, var) over n images and the images of x."""
    k = x.shape[0]
    mb, vb = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    new_mean = (n * mean + k * mb) / (n + k)
    # E[h²] of the union minus its squared mean
    second = (n * (var + mean**2) + k * (vb + mb**2)) / (n + k)
    return new_mean, second - new_mean**2


def test_stream_norm_below_min_batch_pools_the_stream_and_moves_only_when_predicting():
    bn = _bn()
    norm = StreamBatchNorm2d(bn, min_batch=4)
    x = torch.randn(1, 3, 6, 6) * 2 + 3
    mu, var = _pool(bn.running_mean, bn.running_var, 4, x)  # the prior counts as 4 images
    expected = (x - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
    expected = expected * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    norm.train()  # a loss forward: same normalisation, the stream stays
    assert torch.allclose(norm(x), expected, atol=1e-10)
    assert torch.equal(norm.stream_mean, bn.running_mean) and norm.seen == 0
    norm.eval()  # a prediction: the stream moves to the pooled statistics
    assert torch.allclose(norm(x), expected, atol=1e-10)
    assert torch.allclose(norm.stream_mean, mu) and torch.allclose(norm.stream_var, var) and norm.seen == 1
    # a large predicted batch is normalised with its own statistics and pooled into the stream too
    big = torch.randn(6, 3, 6, 6)
    ref = nn.BatchNorm2d(3, track_running_stats=False)
    ref.load_state_dict({"weight": bn.weight, "bias": bn.bias})
    assert torch.allclose(norm(big), ref(big), atol=1e-10)
    mu2, var2 = _pool(mu, var, 5, big)
    assert torch.allclose(norm.stream_mean, mu2) and torch.allclose(norm.stream_var, var2) and norm.seen == 7


def test_stream_norm_with_min_batch_one_is_plain_batch_statistics():
    bn = _bn()
    norm = StreamBatchNorm2d(bn, min_batch=1).eval()
    plain = nn.BatchNorm2d(3, track_running_stats=False)
    plain.load_state_dict({"weight": bn.weight, "bias": bn.bias})
    x = torch.randn(1, 3, 6, 6)
    assert torch.allclose(norm(x), plain(x), atol=1e-10)
    assert torch.equal(norm.stream_mean, bn.running_mean)


def test_router_layers_draw_their_init_in_order():
    """The hidden layer's default init comes first from the RNG, then the gate layer's (paper init): a
    reordering changes every routed result, so the order is pinned against plain nn.Linear draws."""
    from torch import nn

    from iopfl.models.routing import Router

    torch.manual_seed(7)
    router = Router(4, 3, gate_init="paper")
    torch.manual_seed(7)
    hidden, last = nn.Linear(4, 8), nn.Linear(8, 3)
    assert torch.equal(router.mlp[0].weight, hidden.weight) and torch.equal(router.mlp[0].bias, hidden.bias)
    assert torch.equal(router.mlp[2].weight, last.weight)
