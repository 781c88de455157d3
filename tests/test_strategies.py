"""Each baseline's rule on tiny modules against a hand computation, and every strategy end to end."""

import pytest
import torch
from torch import nn

from _tiny import tiny_config
from iopfl.fl import STRATEGIES, StrategyConfig, build_strategy
from iopfl.fl.apfl import ALPHA, mixture
from iopfl.fl.fedbn import norm_state_keys
from iopfl.fl.fedprox import proximal_term
from iopfl.fl.fedrep import head_prefixes
from iopfl.fl.training import LocalTrainer, TrainSettings
from iopfl.models import UNet
from iopfl.seeding import derive_generator


class Odd(nn.Module):
    """BatchNorm under names that say nothing about normalisation."""

    def __init__(self):
        super().__init__()
        self.foo = nn.Conv2d(1, 2, 1)
        self.x = nn.BatchNorm2d(2)
        self.bar = nn.Conv2d(2, 2, 1)

    def forward(self, t):
        return self.bar(self.x(self.foo(t)))


def trainer_for(build, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LocalTrainer(build, torch.randn(6, 1, 4, 4, generator=g), torch.randint(0, 2, (6, 4, 4), generator=g),
                        TrainSettings(batch_size=3))


def init(build):
    torch.manual_seed(1)
    return {k: v.clone() for k, v in build().state_dict().items()}


def test_fedprox_gradient_term_is_mu_times_drift():
    model = nn.Linear(3, 2)
    anchor = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    proximal_term(anchor, weight=0.3)(model).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, 0.3 * (p.detach() - anchor[name]))


def test_fedbn_keeps_every_norm_tensor_local():
    assert norm_state_keys(Odd()) == {"x.weight", "x.bias", "x.running_mean", "x.running_var",
                                      "x.num_batches_tracked"}
    s = build_strategy("fedbn")
    trainer = trainer_for(Odd)
    g0 = init(Odd)
    reply = s.client_round(trainer, g0, {}, derive_generator(0, 1))
    assert not set(reply.weights) & norm_state_keys(Odd())
    assert set(reply.personal) == norm_state_keys(Odd())
    new = s.aggregate(g0, [(reply.weights, 6)])
    assert all(torch.equal(new[k], g0[k]) for k in norm_state_keys(Odd()))
    assert not torch.equal(new["foo.weight"], g0["foo.weight"])
    # the next round starts from the site's own normalisation layers
    personalised = s.personalized_weights(trainer, new, reply.personal, derive_generator(0, 2))
    assert torch.equal(personalised["x.running_mean"], reply.personal["x.running_mean"])


def test_ditto_personal_update():
    g0 = init(Odd)
    far = build_strategy("ditto", StrategyConfig(ditto_lambda=1e6))
    reply = far.client_round(trainer_for(Odd), g0, {}, derive_generator(0, 1))
    drift = max((reply.personal[k] - g0[k]).abs().max().item() for k in ("foo.weight", "bar.weight"))
    free = build_strategy("ditto", StrategyConfig(ditto_lambda=0.0))
    reply0 = free.client_round(trainer_for(Odd), g0, {}, derive_generator(0, 1))
    drift0 = max((reply0.personal[k] - g0[k]).abs().max().item() for k in ("foo.weight", "bar.weight"))
    assert drift < drift0  # λ pulls v towards θ
    # λ = 0 is plain local training of v from where it was (same batches: the generator continues)
    gen = derive_generator(0, 1)
    plain = trainer_for(Odd)
    plain.train(g0, gen)
    expected = plain.train(g0, gen).weights
    assert all(torch.allclose(reply0.personal[k], expected[k]) for k in expected)


def test_fedrep_split_on_the_unet():
    model = UNet(3, 2, 4, 2)
    assert head_prefixes(model) == ("decoders.1.", "head.")
    g = torch.Generator().manual_seed(0)
    build = lambda: UNet(3, 2, 4, 2)  # noqa: E731
    trainer = LocalTrainer(build, torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4, 8, 8), generator=g),
                           TrainSettings(batch_size=2))
    reply = build_strategy("fedrep").client_round(trainer, init(build), {}, derive_generator(0, 1))
    assert reply.personal and all(k.startswith(("decoders.1.", "head.")) for k in reply.personal)
    assert not any(k.startswith(("decoders.1.", "head.")) for k in reply.weights)
    assert set(reply.weights) | set(reply.personal) == set(init(build))


def test_apfl_mixture_by_hand():
    local = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    shared = {"w": torch.tensor([5.0, -1.0]), "n": torch.tensor(9)}
    out = mixture(local, shared, 0.25)
    assert torch.allclose(out["w"], torch.tensor([0.25 * 1 + 0.75 * 5, 0.25 * 3 + 0.75 * -1]))
    assert out["n"].item() == 5
    s = build_strategy("apfl", StrategyConfig(apfl_alpha=0.25))
    g0 = init(Odd)
    reply = s.client_round(trainer_for(Odd), g0, {}, derive_generator(0, 1))
    assert reply.personal[ALPHA].item() == 0.25 and ALPHA not in reply.weights
    p = s.personalized_weights(None, g0, reply.personal, None)
    assert torch.allclose(p["foo.weight"], 0.25 * reply.personal["foo.weight"] + 0.75 * g0["foo.weight"])
    learned = build_strategy("apfl", StrategyConfig(apfl_alpha=0.5, apfl_learn_alpha=True))
    alpha = learned.client_round(trainer_for(Odd), g0, {}, derive_generator(0, 1)).personal[ALPHA].item()
    assert alpha != 0.5 and 0.0 <= alpha <= 1.0


def test_local_sends_nothing_and_centralized_is_pooled():
    g0 = init(Odd)
    reply = build_strategy("local").client_round(trainer_for(Odd), g0, {}, derive_generator(0, 1))
    assert reply.weights == {} and reply.personal
    assert all(torch.equal(v, g0[k]) for k, v in build_strategy("local").aggregate(g0, [({}, 6)]).items())
    assert STRATEGIES["centralized"].pooled and not STRATEGIES["centralized"].federated


def test_fedavgft_does_not_touch_the_global_weights():
    g0 = init(Odd)
    before = {k: v.clone() for k, v in g0.items()}
    tuned = build_strategy("fedavgft").personalized_weights(trainer_for(Odd), g0, {}, derive_generator(0, 1))
    assert all(torch.equal(g0[k], before[k]) for k in g0)
    assert not torch.equal(tuned["foo.weight"], g0["foo.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_runs_end_to_end(tmp_path_factory, name):
    from iopfl.engine.runner import FederatedRun

    cache = tmp_path_factory.getbasetemp() / "strategy-cache"
    results = FederatedRun(tiny_config(cache, [f"fl.method={name}", "fl.rounds=2"]), tmp_path_factory.mktemp(name)).run()
    assert set(results["models"]) == set(STRATEGIES[name].models)
    for entry in results["models"].values():
        assert len(entry["sites"]) == 3 and 0.0 <= entry["mean"]["dice"] <= 1.0
