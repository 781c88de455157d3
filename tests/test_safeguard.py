"""Outside safety: simplex gates keep the routed kernel among the experts, the trust region, and the
label-free safeguard's checks and roll-back, against hand computations."""

import math

import pytest
import torch
from torch import nn

from iopfl.adapt import AdaptConfig, build_method
from iopfl.adapt.losses import anchor
from iopfl.adapt.safeguard import BatchSignals, FallbackLog, SafeState, batch_signals, collapse_reason
from iopfl.config import load_config
from iopfl.errors import UserError
from iopfl.models import UNet
from iopfl.models.routing import RoutedConv2d


def _two_expert_layer(gate_norm: str) -> RoutedConv2d:
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 4, 3, padding=1) for _ in range(2)]
    return RoutedConv2d(convs, gate_norm=gate_norm)


@pytest.mark.parametrize("gate_norm", ["softmax", "sum"])
def test_simplex_gates_keep_the_kernel_in_the_experts_convex_hull(gate_norm):
    """Hand check on a 2-expert layer: W̃ = g·W⁰ + (1 − g)·W¹ with g ∈ [0, 1], so every element of the
    mixed kernel lies between the two experts' — also after the router is pushed hard."""
    layer = _two_expert_layer(gate_norm)
    with torch.no_grad():  # a runaway router: huge logits
        layer.router.mlp[-1].weight.mul_(1e3)
        layer.router.mlp[-1].bias.copy_(torch.tensor([40.0, -40.0]))
    x = torch.randn(5, 3, 8, 8)
    gates = layer.router(x)
    assert torch.allclose(gates.sum(dim=1), torch.ones(5))
    w, b = layer.mixed(gates)
    w0, w1 = layer.weight[0], layer.weight[1]
    g = gates[:, :1].view(5, 1, 1, 1, 1)
    assert torch.allclose(w, g * w0 + (1 - g) * w1, atol=1e-6)
    lo, hi = torch.minimum(w0, w1), torch.maximum(w0, w1)
    assert ((w >= lo - 1e-6) & (w <= hi + 1e-6)).all()
    assert ((b >= torch.minimum(*layer.bias) - 1e-6) & (b <= torch.maximum(*layer.bias) + 1e-6)).all()


def test_sigmoid_gates_can_leave_the_hull():
    """The paper's raw sigmoid gates: both near 1 doubles the kernel — outside the hull."""
    layer = _two_expert_layer("sigmoid")
    with torch.no_grad():
        layer.router.mlp[-1].weight.zero_()
        layer.router.mlp[-1].bias.fill_(20.0)
    w, _ = layer.mixed(layer.router(torch.randn(2, 3, 8, 8)))
    assert torch.allclose(w[0], layer.weight[0] + layer.weight[1], atol=1e-5)


def test_softmax_global_init_starts_at_the_global_expert():
    torch.manual_seed(0)
    layer = RoutedConv2d([nn.Conv2d(3, 4, 3, padding=1) for _ in range(3)], "softmax", "global")
    gates = layer.router(torch.randn(4, 3, 8, 8))
    assert torch.allclose(gates[:, 0], torch.full((4,), 1 - 1e-6), atol=1e-7)


def test_anchor_is_the_kl_from_the_reference():
    ref = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    p = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1)
    expected = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    assert anchor(p, ref).item() == pytest.approx(expected, rel=1e-5)
    assert anchor(ref, ref).item() == pytest.approx(0.0, abs=1e-7)


def _probs(mask: torch.Tensor) -> torch.Tensor:
    """Two-class probabilities ``[B, 2, H, W]`` whose foreground is ``mask [B, H, W]`` (0.9 confident)."""
    fg = 0.1 + 0.8 * mask.float()
    return torch.stack([1 - fg, fg], dim=1)


def test_batch_signals_by_hand():
    a = torch.zeros(2, 10, 10, dtype=torch.bool)
    r = torch.zeros(2, 10, 10, dtype=torch.bool)
    a[:, :5, :4] = True  # 40 px
    r[:, :5, :8] = True  # 80 px, of which the 40 above
    s = batch_signals(_probs(a), _probs(r))
    assert s.foreground == pytest.approx(40 / 200) and s.reference_foreground == pytest.approx(80 / 200)
    assert s.agreement == pytest.approx(2 * 40 / (40 + 80))
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    assert s.entropy == pytest.approx(h, rel=1e-5)
    empty = batch_signals(_probs(torch.zeros_like(a)), _probs(torch.zeros_like(a)))
    assert empty.agreement == 1.0 and empty.foreground == 0.0


def _signals(fg, ref, agreement=1.0, gate_scale=None):
    return BatchSignals(fg, ref, agreement, 0.1, gate_scale, None)


@pytest.mark.parametrize(
    "signals, reason",
    [
        (_signals(0.20, 0.20), None),
        (_signals(0.04, 0.20), "empty"),  # 5x less foreground than BN-adapt
        (_signals(0.06, 0.20, 0.9), None),  # 3.3x less: within the factor 4
        (_signals(0.0, 0.0005), None),  # BN-adapt itself sees (almost) nothing
        (_signals(0.5, 0.1, 0.3), "flood"),
        (_signals(0.005, 0.0, 0.0), "disagree"),  # a few stray pixels: not a flood, but no agreement
        (_signals(0.2, 0.2, 0.4), "disagree"),
        (_signals(0.2, 0.2, 0.9, gate_scale=2.5), "gates"),
        (_signals(0.2, 0.2, 0.9, gate_scale=1.5), None),
    ],
)
def test_collapse_reasons(signals, reason):
    assert collapse_reason(signals, AdaptConfig(safeguard_agreement=0.5, safeguard_foreground=4)) == reason


def test_default_thresholds_catch_a_slow_drift():
    """TENT on Kvasir-SEG (seed 0) drifted to ~55 % of BN-adapt's foreground at an agreement of ~0.7
    within 60 batches, below the old thresholds (0.5, factor 4): the defaults catch that."""
    assert collapse_reason(_signals(0.05, 0.09, 0.72), AdaptConfig()) == "empty"
    assert collapse_reason(_signals(0.08, 0.09, 0.75), AdaptConfig()) == "disagree"
    assert collapse_reason(_signals(0.08, 0.09, 0.9), AdaptConfig()) is None


def test_safe_state_restores_parameters_and_optimizer_not_the_stream():
    torch.manual_seed(0)
    method = build_method(
        "tent", [UNet(3, 2, width=4, depth=2).state_dict()], lambda: UNet(3, 2, width=4, depth=2), AdaptConfig()
    )
    model = method.make_model()
    params = method.trainable(model)
    opt = torch.optim.Adam(params, lr=0.1)
    safe = SafeState(model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        model.train()
        loss = model(torch.randn(4, 3, 16, 16)).softmax(1)[:, 1].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16))  # a prediction moves the normalisation stream
    streams = {k for k in before if "stream" in k or k.endswith("seen")}
    assert streams and any(not torch.equal(before[k], model.state_dict()[k]) for k in streams)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    safe.restore()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k not in streams)  # parameters back
    assert all(torch.equal(moved[k], after[k]) for k in streams)  # the data's statistics kept
    assert opt.state_dict()["state"] == {}


def test_fallback_log_summary():
    log = FallbackLog()
    for reason, to_bn in [(None, False), ("empty", False), ("empty", True), ("gates", False)]:
        log.add(reason, to_bn)
    assert log.summary() == {"batches": 4, "fallbacks": 3, "reasons": {"empty": 2, "gates": 1}, "to_bn": 1}


@pytest.mark.parametrize(
    "key, value",
    [
        ("gate_norm", "softplus"),
        ("lambda_anchor", "-1"),
        ("safeguard", "maybe"),
        ("safeguard_agreement", "1.5"),
        ("safeguard_foreground", "1"),
    ],
)
def test_bad_safety_settings_name_the_key(tmp_path, key, value):
    config = tmp_path / "c.yaml"
    config.write_text("data: {source: synthetic}\n")
    with pytest.raises(UserError, match=f"adapt.{key}"):
        load_config(config, [f"adapt.{key}={value}"])
