"""Test-time methods: losses against hand computations, no label access, determinism."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from iopfl.adapt import METHODS, AdaptConfig, build_method
from iopfl.adapt.losses import (
    apply_transforms,
    consistency,
    draw_transforms,
    entropy,
    invert_transforms,
    published_entropy,
    published_shape_term,
    shape_kernel,
    shape_term,
)
from iopfl.config import load_config
from iopfl.errors import UserError
from iopfl.models import UNet
from iopfl.models.routing import routers, use_batch_statistics
from iopfl.seeding import derive_seed


def test_entropy_of_uniform_and_certain_predictions():
    assert entropy(torch.full((2, 3, 4, 4), 1 / 3)).item() == pytest.approx(1.0)
    certain = torch.zeros(2, 3, 4, 4)
    certain[:, 1] = 1
    assert entropy(certain).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.25, 0.75]).view(1, 2, 1, 1)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert entropy(p).item() == pytest.approx(expected, rel=1e-6)


def test_transforms_invert():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, 6, 6)
    flips, turns = draw_transforms(8, g)
    assert torch.equal(invert_transforms(apply_transforms(x, flips, turns), flips, turns), x)
    assert len(set(zip(flips, turns, strict=True))) > 1


def test_consistency_is_zero_for_an_equivariant_model_without_noise():
    model = nn.Conv2d(2, 2, 1)  # pointwise: commutes with flips and rotations
    x = torch.randn(4, 2, 8, 8)
    probs = model(x).softmax(1)
    c = consistency(model, x, probs, noise_std=0.0, generator=torch.Generator().manual_seed(0))
    assert c.item() == pytest.approx(0.0, abs=1e-10)
    assert consistency(model, x, probs, 0.5, torch.Generator().manual_seed(0)).item() > 0


def test_shape_term():
    const = torch.zeros(1, 2, 8, 8)
    const[:, 1] = 1.0
    assert shape_term(const, 3).item() == 0.0
    checker = torch.zeros(1, 2, 8, 8)
    checker[:, 0] = torch.from_numpy(np.indices((8, 8)).sum(0) % 2).float()
    checker[:, 1] = 1 - checker[:, 0]
    assert shape_term(checker, 3).item() == pytest.approx(1.0)
    # one foreground pixel in the middle of a 5x5 image, 3x3 window: the gradient is 1 on 9 pixels
    dot = torch.zeros(1, 2, 5, 5)
    dot[:, 0] = 1
    dot[0, :, 2, 2] = torch.tensor([0.0, 1.0])
    assert shape_term(dot, 3).item() == pytest.approx(9 / 25)
    assert shape_kernel(384) == 21 and shape_kernel(64) == 5 and shape_kernel(16) == 3


def _experts(n=3):
    torch.manual_seed(0)
    build = lambda: UNet(3, 2, width=4, depth=2)  # noqa: E731
    states = []
    for _ in range(n):
        m = build()
        m.train()
        with torch.no_grad():  # populate running statistics like a trained model
            m(torch.randn(8, 3, 16, 16))
        states.append(m.state_dict())
    return build, states


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_are_deterministic_and_output_probabilities(name):
    build, states = _experts()
    batches = [torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cfg = AdaptConfig(steps_per_batch=2, passes=2, seed=3)
    a = build_method(name, states, build, cfg).adapt_and_predict(batches)
    b = build_method(name, states, build, cfg).adapt_and_predict(batches)
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for p in a:
        assert p.shape == (3, 2, 16, 16)
        assert torch.allclose(p.sum(1), torch.ones(3, 16, 16), atol=1e-5)


def test_adaptive_methods_change_predictions_over_passes():
    build, states = _experts()
    batches = [torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    one = build_method("iopfl", states, build, AdaptConfig(passes=1)).adapt_and_predict(batches)
    three = build_method("iopfl", states, build, AdaptConfig(passes=3)).adapt_and_predict(batches)
    assert not torch.equal(one[0], three[0])


def test_unknown_method():
    build, states = _experts(2)
    with pytest.raises(UserError, match="unknown adaptation method"):
        build_method("magic", states, build, AdaptConfig())


def _batches(sizes=(5, 4), seed=0):
    return [torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed + i)) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("gate_norm", ["softmax", "sigmoid", "sum"])
def test_global_gate_init_is_bn_adapt_before_any_step(gate_norm):
    build, states = _experts()
    batches = _batches()
    bn = build_method("bn", states, build, AdaptConfig()).adapt_and_predict(batches)
    cfg = AdaptConfig(steps_per_batch=0, gate_init="global", gate_norm=gate_norm)
    routed = build_method("iopfl", states, build, cfg).adapt_and_predict(batches)
    for a, b in zip(routed, bn, strict=True):
        assert (a - b).abs().max().item() < 1e-5
    # the default start is not the global expert: the default routers mix all experts
    paper = build_method("iopfl", states, build, AdaptConfig(steps_per_batch=0)).adapt_and_predict(batches)
    assert (paper[0] - bn[0]).abs().max().item() > 1e-3


def _averaged_network(build, states):
    """A plain network whose convolutions are the experts' mean, normalisation from expert 0."""
    mean = {k: v.clone() for k, v in states[0].items()}
    for name, module in build().named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            for key in (f"{name}.weight", f"{name}.bias"):
                if key in mean:
                    mean[key] = torch.stack([s[key] for s in states]).mean(dim=0)
    net = build()
    net.load_state_dict(mean)
    use_batch_statistics(net)
    return net.eval()


@pytest.mark.parametrize("gate_norm", ["softmax", "sigmoid", "sum"])
def test_uniform_gate_init_is_the_mean_of_the_experts(gate_norm):
    build, states = _experts(4)
    batches = _batches()
    cfg = AdaptConfig(steps_per_batch=0, gate_init="uniform", gate_norm=gate_norm)
    routed = build_method("iopfl", states, build, cfg).adapt_and_predict(batches)
    net = _averaged_network(build, states)
    with torch.no_grad():
        for p, x in zip(routed, batches, strict=True):
            assert (p - net(x).softmax(1)).abs().max().item() < 1e-5


@pytest.mark.parametrize("gate_init", ["global", "uniform"])
def test_fixed_gate_inits_still_adapt(gate_init):
    build, states = _experts()
    batches = _batches()
    still = build_method("iopfl", states, build, AdaptConfig(steps_per_batch=0, gate_init=gate_init))
    moved = build_method("iopfl", states, build, AdaptConfig(steps_per_batch=3, gate_init=gate_init))
    assert not torch.equal(still.adapt_and_predict(batches)[1], moved.adapt_and_predict(batches)[1])
    # the routers' last layers left their start (the first layers follow once those are non-zero)
    s, m = still.gate_summary(["g", "a", "b"]), moved.gate_summary(["g", "a", "b"])
    assert s["mean_gates"] != m["mean_gates"]


def test_published_entropy_sums_over_the_batch():
    p = torch.tensor([[0.25, 0.75], [0.5, 0.5]]).view(2, 2, 1, 1)  # two samples, one pixel
    h = lambda q: -q * math.log(q + 1e-6)  # noqa: E731
    # per class: sum over the two samples, / log 2; then mean over the two classes
    expected = ((h(0.25) + h(0.5)) + (h(0.75) + h(0.5))) / math.log(2) / 2
    assert published_entropy(p).item() == pytest.approx(expected, rel=1e-6)
    # B/K times the per-pixel entropy (up to the 1e-6 inside the log)
    q = torch.rand(6, 2, 5, 5).softmax(1)
    assert published_entropy(q).item() == pytest.approx(6 / 2 * entropy(q).item(), rel=1e-4)


def test_published_shape_term_is_a_scaled_norm():
    dot = torch.zeros(1, 2, 5, 5)
    dot[:, 0] = 1
    dot[0, :, 2, 2] = torch.tensor([0.0, 1.0])
    # the gradient is 1 on the 9 pixels of the 3x3 window: ‖·‖₂ = 3
    assert published_shape_term(dot, 3).item() == pytest.approx(3e-6)


@pytest.mark.parametrize("detach", [True, False])
def test_consistency_gradient_reaches_the_clean_branch_only_when_not_detached(detach):
    torch.manual_seed(0)
    perturbed, clean = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
    x = torch.randn(3, 2, 8, 8)
    c = consistency(perturbed, x, clean(x).softmax(1), 0.5, torch.Generator().manual_seed(0), detach_target=detach)
    c.backward()
    assert perturbed.weight.grad is not None and perturbed.weight.grad.abs().sum() > 0
    if detach:
        assert clean.weight.grad is None
    else:
        assert clean.weight.grad is not None and clean.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("protocol", ["online", "published"])
def test_dropout_at_prediction_only_under_the_published_protocol(protocol):
    build, states = _experts()
    method = build_method("iopfl", states, build, AdaptConfig(protocol=protocol))
    model = method.make_model()
    x = _batches()[0]
    first, second = method.predict(model, x), method.predict(model, x)
    assert torch.equal(first, second) == (protocol == "online")


@pytest.mark.parametrize(
    "protocol, passes, expected", [("online", None, 1), ("published", None, 10), ("published", 3, 3), ("online", 2, 2)]
)
def test_passes_of_each_protocol(protocol, passes, expected, monkeypatch):
    build, states = _experts(2)
    calls = []
    method = build_method("iopfl", states, build, AdaptConfig(protocol=protocol, passes=passes, lambda_consistency=0))
    original = type(method).loss_terms
    monkeypatch.setattr(type(method), "loss_terms", lambda self, *a: calls.append(1) or original(self, *a))
    method.adapt_and_predict(_batches((4, 4, 4)))
    assert len(calls) == 3 * expected


@pytest.mark.parametrize("protocol", ["online", "published"])
def test_augmentation_draws_per_batch(protocol):
    build, states = _experts(2)
    method = build_method("iopfl", states, build, AdaptConfig(protocol=protocol))
    a = torch.randn(4, generator=method._generator(0, 0))
    b = torch.randn(4, generator=method._generator(2, 5))
    # the published script re-seeds before every batch: the same draws for every batch of every pass
    assert torch.equal(a, b) == (protocol == "published")


def test_published_loss_is_its_three_terms(monkeypatch):
    build, states = _experts(2)
    cfg = AdaptConfig(protocol="published", noise_std=0.0)
    method = build_method("iopfl", states, build, cfg)
    model = method.make_model()
    model.eval()  # dropout off: the clean and the target forward passes agree, so the terms can be rebuilt
    x = _batches()[0]
    seen = []
    monkeypatch.setattr(
        "iopfl.adapt.iopfl.consistency", lambda *a, **kw: seen.append((a[2].requires_grad, kw)) or consistency(*a, **kw)
    )
    total = sum(method.loss_terms(model, x, torch.Generator().manual_seed(0), None).values())
    assert seen == [(True, {"detach_target": False})]  # the target keeps its graph
    probs = model(x).softmax(1)
    view = consistency(model, x, probs, 0.0, torch.Generator().manual_seed(0))
    expected = 10 * published_entropy(probs) + 0.1 * view / 2 + published_shape_term(probs, shape_kernel(16))
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gate_summary_is_the_sample_mean_of_the_last_pass_gates():
    build, states = _experts()
    batches = _batches((5, 2))
    method = build_method("iopfl", states, build, AdaptConfig(steps_per_batch=0))
    method.adapt_and_predict(batches)
    summary = method.gate_summary(["global", "A", "B"])
    with torch.random.fork_rng(devices=[]):  # the same routers: the same seeded initialisation
        torch.manual_seed(derive_seed(0, "adapt"))
        model = method.make_model()
    model.eval()
    sums = 0
    with torch.no_grad():
        for x in batches:
            model(x)
            sums = sums + torch.stack([r.last_gates.sum(0) for r in routers(model)])
    assert summary["experts"] == ["global", "A", "B"]
    assert len(summary["layers"]) == len(routers(model)) and len(summary["mean_gates"][0]) == 3
    assert torch.allclose(torch.tensor(summary["mean_gates"]), sums / 7, atol=1e-6)


def test_bn_adapt_one_image_at_a_time_follows_the_stream_by_hand():
    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))  # noqa: E731
    net = build()
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    net[1].weight.data.uniform_(0.5, 1.5)
    batches = _batches((1, 1, 1, 1))
    got = build_method("bn", [net.state_dict()], build, AdaptConfig(min_batch_stats=4)).adapt_and_predict(batches)
    bn = net[1]
    # the stream: 4 pseudo-images with the source's statistics, then every image predicted so far
    firsts, seconds = [bn.running_mean] * 4, [bn.running_var + bn.running_mean**2] * 4
    with torch.no_grad():
        for x, p in zip(batches, got, strict=True):
            h = net[0](x)
            firsts.append(h.mean((0, 2, 3)))
            seconds.append((h**2).mean((0, 2, 3)))
            mean = torch.stack(firsts).mean(0)
            var = torch.stack(seconds).mean(0) - mean**2
            out = (h - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
            expected = (out * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)).softmax(1)
            assert torch.allclose(p, expected, atol=1e-5)
    # with the fallback off, each image is normalised over itself alone
    plain = build_method("bn", [net.state_dict()], build, AdaptConfig(min_batch_stats=1)).adapt_and_predict(batches)
    assert not torch.allclose(plain[-1], got[-1], atol=1e-3)


@pytest.mark.parametrize(
    "key, value",
    [("adapt.gate_init", "magic"), ("adapt.protocol", "paper"), ("adapt.min_batch_stats", "0"), ("adapt.passes", "0")],
)
def test_bad_adapt_values_name_the_key(key, value):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])
