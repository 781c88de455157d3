"""Test-time methods: losses against hand computations, the online protocol, no label access, determinism."""

import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from iopfl.adapt import METHODS, AdaptConfig, TTAMethod, build_method
from iopfl.adapt.losses import Transforms, consistency, entropy, shape_kernel, shape_term
from iopfl.errors import UserError
from iopfl.models import UNet

# ---- loss pieces -------------------------------------------------------------------------------

def test_entropy_of_uniform_certain_and_hand_computed_predictions():
    assert entropy(torch.full((2, 3, 4, 4), 1 / 3)).item() == pytest.approx(1.0)
    assert entropy(torch.full((1, 2, 3, 3), 0.5)).item() == pytest.approx(1.0)
    certain = torch.zeros(2, 3, 4, 4)
    certain[:, 1] = 1
    assert entropy(certain).item() == pytest.approx(0.0, abs=1e-6)
    # two pixels: (0.25, 0.75) and (0.5, 0.5) → mean of their normalised entropies
    p = torch.tensor([[0.25, 0.5], [0.75, 0.5]]).view(1, 2, 1, 2)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert entropy(p).item() == pytest.approx((h + 1.0) / 2, rel=1e-6)


def _hand_transform(xi, flip, turns):
    return torch.rot90(xi.flip(-1) if flip else xi, turns, dims=(-2, -1))


def test_transforms_match_their_definition_and_invert():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 6, 6)
    t = Transforms.draw(16, g)
    assert len(set(zip(t.flips.tolist(), t.turns.tolist()))) > 2  # per-sample, not one for the batch
    expected = torch.stack([_hand_transform(xi, f, k) for xi, f, k in zip(x, t.flips.tolist(), t.turns.tolist())])
    assert torch.equal(t.apply(x), expected)
    assert torch.equal(t.invert(t.apply(x)), x)
    assert torch.equal(t.apply(t.invert(x)), x)


def test_transforms_keep_non_square_shapes():
    t = Transforms.draw(8, torch.Generator().manual_seed(1), square=False)
    assert set(t.turns.tolist()) <= {0, 2}
    x = torch.randn(8, 1, 4, 7)
    assert torch.equal(t.invert(t.apply(x)), x)


def test_consistency_is_zero_for_an_equivariant_model_without_noise():
    torch.manual_seed(0)
    model = nn.Conv2d(2, 3, 1)  # pointwise: commutes with flips and rotations
    x = torch.randn(6, 2, 8, 8)
    probs = model(x).softmax(1)
    c = consistency(model, x, probs, noise_std=0.0, generator=torch.Generator().manual_seed(0))
    assert c.item() == pytest.approx(0.0, abs=1e-12)
    assert consistency(model, x, probs, 0.5, torch.Generator().manual_seed(0)).item() > 0


def test_consistency_hand_computed_for_a_non_equivariant_model():
    """A model that adds a left-to-right ramp is not flip-invariant: compare with the formula."""
    ramp = torch.linspace(-2, 2, 4).view(1, 1, 1, 4)

    def model(x):
        return torch.cat([x, x + ramp], dim=1)

    x = torch.randn(5, 1, 4, 4)
    probs = model(x).softmax(1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = consistency(model, x, probs, 0.1, g1)
    noise = 0.1 * torch.randn(x.shape, generator=g2)
    t = Transforms.draw(5, g2)
    view = t.invert(model(t.apply(x + noise)).softmax(1))
    assert got.item() == pytest.approx(((view - probs) ** 2).sum(1).mean().item(), rel=1e-6)


def test_shape_term():
    const = torch.zeros(1, 2, 8, 8)
    const[:, 1] = 1.0
    assert shape_term(const, 3).item() == 0.0
    assert shape_term(torch.full((2, 3, 8, 8), 1 / 3), 5).item() == pytest.approx(0.0, abs=1e-7)
    checker = torch.zeros(1, 2, 8, 8)
    checker[:, 0] = torch.from_numpy(np.indices((8, 8)).sum(0) % 2).float()
    checker[:, 1] = 1 - checker[:, 0]
    assert shape_term(checker, 3).item() == pytest.approx(1.0)
    # one foreground pixel in the middle of a 5x5 image, 3x3 window: the gradient is 1 on 9 pixels
    dot = torch.zeros(1, 2, 5, 5)
    dot[:, 0] = 1
    dot[0, :, 2, 2] = torch.tensor([0.0, 1.0])
    assert shape_term(dot, 3).item() == pytest.approx(9 / 25)
    # foreground = 1 − background: with 3 classes, class 1 and 2 both count as foreground
    three = torch.zeros(1, 3, 4, 4)
    three[:, 1, :, :2] = 1
    three[:, 2, :, 2:] = 1
    assert shape_term(three, 3).item() == 0.0


def test_shape_kernel_scales_with_the_image():
    assert shape_kernel(384) == 21 and shape_kernel(768) == 43
    assert shape_kernel(64) == 5 and shape_kernel(16) == 3 and shape_kernel(128) == 7
    assert shape_kernel(384, 8) == 9 and shape_kernel(384, 3) == 3


# ---- methods -----------------------------------------------------------------------------------

def _experts(n=3):
    torch.manual_seed(0)
    build = lambda: UNet(3, 2, width=4, depth=2)
    states = []
    for i in range(n):
        m = build()
        m.train()
        with torch.no_grad():  # populate running statistics like a trained model
            m(torch.randn(8, 3, 16, 16) * (1 + i) + i)
        states.append(m.state_dict())
    return build, states


def _batches(n=3, b=3):
    return [torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 + 1 for i in range(n)]


def test_methods_take_inputs_only():
    """The interface has no place for labels: a stream of image tensors in, probabilities out."""
    for cls in METHODS.values():
        params = list(inspect.signature(cls.adapt_and_predict).parameters)
        assert params == ["self", "batches"]
        assert issubclass(cls, TTAMethod) and cls.name in METHODS
    build, states = _experts(2)
    with pytest.raises(UserError, match="batch 0"):
        build_method("tent", states, build, AdaptConfig()).adapt_and_predict([(torch.zeros(1, 3, 16, 16), 0)])


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_are_deterministic_and_output_probabilities(name):
    build, states = _experts()
    batches = _batches()
    cfg = AdaptConfig(steps_per_batch=2, passes=2, seed=3)
    rng_before = torch.get_rng_state()
    a = build_method(name, states, build, cfg).adapt_and_predict(iter(batches))  # any iterable
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched
    b = build_method(name, states, build, cfg).adapt_and_predict(batches)
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    for p in a:
        assert p.shape == (3, 2, 16, 16) and not p.requires_grad
        assert (p >= 0).all() and (p <= 1).all()
        torch.testing.assert_close(p.sum(1), torch.ones(3, 16, 16), atol=1e-5, rtol=0)


def test_global_bn_and_ensemble_are_what_they_say():
    build, states = _experts()
    x = _batches(1)[0]
    models = []
    for s in states:
        m = build()
        m.load_state_dict(s)
        models.append(m.eval())
    with torch.no_grad():
        (glob,) = build_method("global", states, build, AdaptConfig()).adapt_and_predict([x])
        torch.testing.assert_close(glob, models[0](x).softmax(1))
        (ens,) = build_method("ensemble", states, build, AdaptConfig()).adapt_and_predict([x])
        torch.testing.assert_close(ens, torch.stack([m(x).softmax(1) for m in models]).mean(0))
        (bn,) = build_method("bn", states, build, AdaptConfig()).adapt_and_predict([x])
        torch.testing.assert_close(bn, models[0].train()(x).softmax(1))  # test-batch statistics
        assert not torch.allclose(bn, glob)


def test_tent_adapts_only_the_normalisation_affine():
    build, states = _experts()
    method = build_method("tent", states, build, AdaptConfig())
    model = method.make_model()
    params = method.trainable(model)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(p.dim() == 1 for p in params) and len(params) == 2 * sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["tent", "iopfl"])
def test_adaptive_methods_report_the_last_pass(name):
    build, states = _experts()
    batches = _batches(2)
    one = build_method(name, states, build, AdaptConfig(passes=1)).adapt_and_predict(batches)
    three = build_method(name, states, build, AdaptConfig(passes=3)).adapt_and_predict(batches)
    assert not torch.equal(one[0], three[0])
    frozen = build_method(name, states, build, AdaptConfig(steps_per_batch=0)).adapt_and_predict(batches)
    assert not torch.equal(one[0], frozen[0])  # the step before predicting a batch takes effect


@pytest.mark.parametrize("gate_norm", ["sigmoid", "sum"])
def test_iopfl_seed_and_gate_norm(gate_norm):
    build, states = _experts()
    batches = _batches(2)
    a = build_method("iopfl", states, build, AdaptConfig(seed=0, gate_norm=gate_norm)).adapt_and_predict(batches)
    b = build_method("iopfl", states, build, AdaptConfig(seed=1, gate_norm=gate_norm)).adapt_and_predict(batches)
    assert not torch.equal(a[0], b[0])


def test_iopfl_loss_terms_can_be_switched_off():
    build, states = _experts()
    x = _batches(1)[0]
    g = torch.Generator().manual_seed(0)
    only_h = build_method("iopfl", states, build, AdaptConfig(lambda_consistency=0, lambda_shape=0))
    model = only_h.make_model()
    model.eval()  # no dropout, so the loss is a function of the model alone
    loss = only_h.loss(model, x, g)
    assert loss.item() == pytest.approx(10 * entropy(model(x).softmax(1)).item(), rel=1e-5)


def test_registry_and_unknown_method():
    assert list(METHODS) == ["global", "bn", "tent", "ensemble", "iopfl"]
    build, states = _experts(2)
    with pytest.raises(UserError, match="unknown adaptation method 'magic'.*global, bn, tent, ensemble, iopfl"):
        build_method("magic", states, build, AdaptConfig())
    assert build_method(None, states, build, AdaptConfig(method="tent")).name == "tent"
    with pytest.raises(ValueError, match="unknown adaptation method"):
        AdaptConfig(method="magic")


def test_iopfl_needs_personalised_experts():
    build, states = _experts(1)
    with pytest.raises(UserError, match="personalised"):
        build_method("iopfl", states, build, AdaptConfig()).adapt_and_predict(_batches(1))
