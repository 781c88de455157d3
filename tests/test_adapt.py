"""Test-time methods: losses against hand computations, no label access, determinism."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from iopfl.adapt import METHODS, AdaptConfig, build_method
from iopfl.adapt.losses import apply_transforms, consistency, draw_transforms, entropy, invert_transforms, \
    shape_kernel, shape_term
from iopfl.errors import UserError
from iopfl.models import UNet


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
    assert len(set(zip(flips, turns))) > 1


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
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
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
