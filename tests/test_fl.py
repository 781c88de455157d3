"""Strategy rules against hand-computed tensors."""

import torch
from torch import nn

from iopfl.fl import FedAvg, build_strategy
from iopfl.fl.aggregation import ema, weighted_average
from iopfl.fl.iopfl import IOPFLInside
from iopfl.fl.training import LocalTrainer, TrainSettings
from iopfl.seeding import derive_generator


def _state(w, b, steps):
    return {"w": torch.tensor(w), "bn.num_batches_tracked": torch.tensor(steps)}


def test_weighted_average_matches_hand_computation():
    a = _state([1.0, 2.0], 0, 10)
    b = _state([4.0, -1.0], 0, 20)
    out = weighted_average([a, b], [1, 2])
    # (1·[1,2] + 2·[4,-1]) / 3 = [3, 0]; steps (10 + 40)/3 = 16.67 → 17
    assert torch.allclose(out["w"], torch.tensor([3.0, 0.0]))
    assert out["bn.num_batches_tracked"].item() == 17
    assert out["bn.num_batches_tracked"].dtype == a["bn.num_batches_tracked"].dtype


def test_fedavg_aggregate_is_sample_weighted():
    g = {"w": torch.zeros(2)}
    replies = [({"w": torch.tensor([2.0, 2.0])}, 30), ({"w": torch.tensor([-1.0, 5.0])}, 10)]
    out = FedAvg().aggregate(g, replies)
    assert torch.allclose(out["w"], torch.tensor([1.25, 2.75]))


def test_ema_update_matches_hand_computation():
    phi = {"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(3)}
    theta = {"w": torch.tensor([0.0, 10.0]), "n": torch.tensor(7)}
    out = ema(phi, theta, alpha=0.1)
    assert torch.allclose(out["w"], torch.tensor([0.1, 9.0]))
    assert out["n"].item() == 7


def test_iopfl_first_participation_copies_then_ema():
    s = IOPFLInside()
    theta1 = {"w": torch.tensor([2.0])}
    phi1 = s.update_personal({}, theta1)
    assert torch.equal(phi1["w"], theta1["w"])
    theta1["w"] += 1  # a deep copy: later changes to θ_k must not leak into φ_k
    assert phi1["w"].item() == 2.0
    phi2 = s.update_personal(phi1, {"w": torch.tensor([12.0])})
    assert torch.allclose(phi2["w"], torch.tensor([0.1 * 2 + 0.9 * 12]))


def test_iopfl_rule_equals_the_gradient_form():
    """φ^t = φ^{t-1} − (1−α)[(φ^{t-1} − θ^{t-1}) + Δ_k^t], Δ_k^t = θ^{t-1} − θ_k^t (docs/METHOD.md §1)."""
    g = torch.Generator().manual_seed(0)
    phi, theta_prev, theta_k = (torch.randn(5, generator=g) for _ in range(3))
    alpha = 0.3
    s = build_strategy("iopfl", {"alpha": alpha})
    ema_form = s.update_personal({"w": phi}, {"w": theta_k})["w"]
    grad_form = phi - (1 - alpha) * ((phi - theta_prev) + (theta_prev - theta_k))
    assert torch.allclose(ema_form, grad_form, atol=1e-6)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_personal_weights_are_never_sent():
    torch.manual_seed(0)
    trainer = LocalTrainer(
        _Tiny, torch.randn(6, 1, 4, 4), torch.randint(0, 2, (6, 4, 4)), TrainSettings(batch_size=3, channels_last=False)
    )
    strategy = IOPFLInside()
    global_w = {k: v.clone() for k, v in _Tiny().state_dict().items()}
    personal = {}
    for round_ in (1, 2):
        reply = strategy.client_round(trainer, global_w, personal, derive_generator(0, round_))
        personal = reply.personal
        sent = reply.weights
        # what is sent is exactly θ_k (the locally trained model), not φ_k
        assert set(sent) == set(global_w)
        if round_ == 2:
            assert any(not torch.equal(sent[k], personal[k]) for k in sent if sent[k].is_floating_point())
        assert all(sent[k].data_ptr() != personal[k].data_ptr() for k in sent)
        global_w = strategy.aggregate(global_w, [(sent, reply.num_samples)])


def test_local_training_is_deterministic_for_a_seed():
    torch.manual_seed(0)
    images, masks = torch.randn(6, 1, 4, 4), torch.randint(0, 2, (6, 4, 4))
    trainer = LocalTrainer(_Tiny, images, masks, TrainSettings(batch_size=2, channels_last=False))
    start = {k: v.clone() for k, v in _Tiny().state_dict().items()}
    a = trainer.train(start, derive_generator(1, "x")).weights
    b = trainer.train(start, derive_generator(1, "x")).weights
    c = trainer.train(start, derive_generator(2, "x")).weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_frozen_parameters_match_a_masked_optimizer():
    """Training a subset with the rest frozen gives what a naive loop gives that computes every
    gradient and steps only the subset; frozen weights stay put and are trainable again afterwards."""
    from iopfl.fl.training import iterate_batches
    from iopfl.models.losses import segmentation_loss
    from iopfl.models.unet import UNet

    build = lambda: UNet(1, 2, 4, 2)  # noqa: E731
    torch.manual_seed(0)
    images, masks = torch.randn(6, 1, 8, 8), torch.randint(0, 2, (6, 8, 8))
    settings = TrainSettings(batch_size=2, channels_last=False)
    start = {k: v.clone() for k, v in build().state_dict().items()}
    head = lambda name: name.startswith("head.")  # noqa: E731
    trainer = LocalTrainer(build, images, masks, settings)
    ours = trainer.train(start, derive_generator(1, "x"), trainable=head).weights
    assert all(p.requires_grad for p in trainer.model.parameters())

    naive = build()
    naive.load_state_dict(start)
    naive.train()
    chosen = [p for n, p in naive.named_parameters() if head(n)]
    opt = torch.optim.Adam(chosen, lr=settings.lr, amsgrad=settings.amsgrad)
    for idx in iterate_batches(6, 2, derive_generator(1, "x")):
        loss = segmentation_loss(naive(images[idx]), masks[idx], settings.ce_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in naive.state_dict().items():
        torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert torch.equal(ours["encoders.0.0.weight"], start["encoders.0.0.weight"])
    assert not torch.equal(ours["head.weight"], start["head.weight"])
