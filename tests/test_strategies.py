"""Each baseline's rule on tiny modules against a hand computation, and every strategy end to end."""

import pytest
import torch
from torch import nn

from _tiny import tiny_config
from iopfl.fl import STRATEGIES, build_strategy
from iopfl.fl.apfl import ALPHA, mixed_forward, mixture
from iopfl.fl.fedbn import norm_state_keys
from iopfl.fl.fedprox import proximal_term
from iopfl.fl.fedrep import head_prefixes
from iopfl.fl.training import LocalTrainer, TrainSettings
from iopfl.models import UNet
from iopfl.seeding import derive_generator

ODD_BN = {"x.weight", "x.bias", "x.running_mean", "x.running_var", "x.num_batches_tracked"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and steadier on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Odd(nn.Module):
    """BatchNorm under names that say nothing about normalisation."""

    def __init__(self):
        super().__init__()
        self.foo = nn.Conv2d(1, 2, 1)
        self.x = nn.BatchNorm2d(2)
        self.bar = nn.Conv2d(2, 2, 1)

    def forward(self, t):
        return self.bar(self.x(self.foo(t)))


class Spy:
    """Wraps ``trainer.train`` and records each call's start weights and keyword arguments."""

    def __init__(self, trainer):
        self.calls, self._train = [], trainer.train
        trainer.train = self

    def __call__(self, weights, generator, **kw):
        self.calls.append(({k: v.clone() for k, v in weights.items()}, kw))
        return self._train(weights, generator, **kw)


def trainer_for(build, seed=0, lr=1e-3, epochs=1):
    g = torch.Generator().manual_seed(seed)
    return LocalTrainer(
        build,
        torch.randn(6, 1, 4, 4, generator=g),
        torch.randint(0, 2, (6, 4, 4), generator=g),
        TrainSettings(batch_size=3, lr=lr, epochs=epochs),
    )


def init(build, seed=1):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build().state_dict().items()}


def same(a, b, keys=None):
    return all(torch.equal(a[k], b[k]) for k in (a if keys is None else keys))


# --- FedProx ------------------------------------------------------------------------------------


def test_fedprox_gradient_term_is_mu_times_drift():
    model = nn.Linear(3, 2)
    g = torch.Generator().manual_seed(0)
    anchor = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    original = {k: v.clone() for k, v in anchor.items()}
    penalty = proximal_term(anchor, weight=0.3)
    for v in anchor.values():  # a frozen copy: later changes to the caller's tensors do not matter
        v.add_(100.0)
    value = penalty(model)
    value.backward()
    expected = 0.15 * sum(((p.detach() - original[n]) ** 2).sum() for n, p in model.named_parameters())
    assert torch.allclose(value, expected)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, 0.3 * (p.detach() - original[name]))


def test_fedprox_client_anchors_mu_at_the_global_weights():
    g0 = init(Odd)
    trainer = trainer_for(Odd)
    spy = Spy(trainer)
    reply = build_strategy("fedprox", {"mu": 0.5}).client_round(trainer, g0, {}, derive_generator(0, 1))
    ((start, kw),) = spy.calls
    assert same(start, g0) and set(reply.weights) == set(g0) and not reply.personal
    probe = Odd()
    probe.load_state_dict(g0)
    assert kw["penalty"](probe).item() == 0.0
    with torch.no_grad():
        for p in probe.parameters():
            p.add_(1.0)
    n = sum(p.numel() for p in probe.parameters())
    assert kw["penalty"](probe).item() == pytest.approx(0.25 * n)  # (μ/2)·Σ 1²


# --- FedBN --------------------------------------------------------------------------------------


def test_fedbn_finds_norm_layers_by_type_not_name():
    assert norm_state_keys(Odd()) == ODD_BN
    net = nn.Sequential(
        nn.Conv2d(1, 4, 1),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.LayerNorm([4, 2, 2]),
        nn.Conv2d(4, 1, 1),
    )
    assert norm_state_keys(net) == {
        "1.weight",
        "1.bias",
        "2.weight",
        "2.bias",
        "2.running_mean",
        "2.running_var",
        "2.num_batches_tracked",
        "3.weight",
        "3.bias",
    }


def test_fedbn_keeps_every_norm_tensor_local():
    s = build_strategy("fedbn")
    trainer = trainer_for(Odd)
    g0 = init(Odd)
    reply = s.client_round(trainer, g0, {}, derive_generator(0, 1))
    assert not set(reply.weights) & ODD_BN
    assert set(reply.personal) == ODD_BN
    assert not torch.equal(reply.personal["x.running_mean"], g0["x.running_mean"])  # trained locally
    new = s.aggregate(g0, [(reply.weights, 6)])
    assert same(new, g0, ODD_BN)  # the server's normalisation layers are untouched
    assert not torch.equal(new["foo.weight"], g0["foo.weight"])
    # round 2 starts from the new global weights with the site's own normalisation layers substituted
    spy = Spy(trainer)
    s.client_round(trainer, new, reply.personal, derive_generator(0, 2))
    start = spy.calls[0][0]
    assert same(start, reply.personal, ODD_BN) and same(start, new, set(new) - ODD_BN)
    personalised = s.personalized_weights(trainer, new, reply.personal, derive_generator(0, 2))
    assert same(personalised, reply.personal, ODD_BN) and same(personalised, new, set(new) - ODD_BN)
    assert s.models == ("personalized",)


# --- SiloBN -------------------------------------------------------------------------------------

ODD_STATS = {"x.running_mean", "x.running_var", "x.num_batches_tracked"}


def test_silobn_keeps_statistics_local_and_shares_the_affine_parameters():
    s = build_strategy("silobn")
    trainer = trainer_for(Odd)
    g0 = init(Odd)
    reply = s.client_round(trainer, g0, {}, derive_generator(0, 1))
    assert set(reply.personal) == ODD_STATS  # the statistics stay
    assert {"x.weight", "x.bias"} <= set(reply.weights)  # γ, β travel
    assert set(reply.weights) == set(g0) - ODD_STATS
    # hand computation of the server half: two sites' γ averaged by sample count, statistics untouched
    other = {k: v + 1.0 if v.is_floating_point() else v for k, v in reply.weights.items()}
    new = s.aggregate(g0, [(reply.weights, 6), (other, 2)])
    assert torch.allclose(new["x.weight"], reply.weights["x.weight"] + 0.25)
    assert same(new, g0, ODD_STATS)
    # round 2 starts from the new global weights with the site's own statistics substituted
    spy = Spy(trainer)
    s.client_round(trainer, new, reply.personal, derive_generator(0, 2))
    start = spy.calls[0][0]
    assert same(start, reply.personal, ODD_STATS) and same(start, new, set(new) - ODD_STATS)
    personalised = s.personalized_weights(trainer, new, reply.personal, derive_generator(0, 2))
    assert same(personalised, reply.personal, ODD_STATS) and same(personalised, new, set(new) - ODD_STATS)
    assert s.models == ("personalized",)


# --- Ditto --------------------------------------------------------------------------------------


def test_ditto_personal_update():
    g0 = init(Odd)
    # λ = 0: v is plain local training from where v was; the FedAvg part comes first on the same stream
    free = build_strategy("ditto", {"ditto_lambda": 0.0})
    r1 = free.client_round(trainer_for(Odd), g0, {}, derive_generator(0, 1))
    g1 = init(Odd, seed=2)  # a different "global" for round 2, so "from v" and "from θ" differ
    r2 = free.client_round(trainer_for(Odd), g1, r1.personal, derive_generator(0, 2))
    gen, plain = derive_generator(0, 2), trainer_for(Odd)
    fedavg_part = plain.train(g1, gen)
    assert same(r2.weights, fedavg_part.weights)  # what is sent is FedAvg's local model
    expected = plain.train(r1.personal, gen).weights
    assert all(torch.allclose(r2.personal[k], expected[k]) for k in expected)
    # the penalty Ditto uses is (λ/2)‖v − θ^{t-1}‖², anchored at this round's global weights
    trainer = trainer_for(Odd)
    spy = Spy(trainer)
    build_strategy("ditto", {"ditto_lambda": 2.0}).client_round(trainer, g1, r1.personal, derive_generator(0, 2))
    start, kw = spy.calls[1]
    assert same(start, r1.personal)
    probe = Odd()
    probe.load_state_dict(g1)
    with torch.no_grad():
        probe.foo.weight.add_(0.5)
    assert kw["penalty"](probe).item() == pytest.approx(1.0 * 0.25 * probe.foo.weight.numel())
    # λ → ∞ holds v at θ over 40 steps (Adam's steps of ~lr oscillate around it); λ = 0 drifts away
    lr, params = 0.01, ("foo.weight", "foo.bias", "bar.weight", "bar.bias")

    def drift(lam):
        v = (
            build_strategy("ditto", {"ditto_lambda": lam})
            .client_round(trainer_for(Odd, lr=lr, epochs=20), g1, {}, derive_generator(0, 3))
            .personal
        )
        return max((v[k] - g1[k]).abs().max().item() for k in params)

    assert drift(1e8) <= 2 * lr < 10 * lr < drift(0.0)


# --- FedRep -------------------------------------------------------------------------------------


def test_fedrep_split_on_the_unet():
    build = lambda: UNet(3, 2, 4, 2)  # noqa: E731
    assert head_prefixes(build()) == ("decoders.1.", "head.")
    head = lambda k: k.startswith(("decoders.1.", "head."))  # noqa: E731
    g = torch.Generator().manual_seed(0)
    trainer = LocalTrainer(
        build,
        torch.randn(4, 3, 8, 8, generator=g),
        torch.randint(0, 2, (4, 8, 8), generator=g),
        TrainSettings(batch_size=2),
    )
    g0 = init(build)
    spy = Spy(trainer)
    s = build_strategy("fedrep")
    reply = s.client_round(trainer, g0, {}, derive_generator(0, 1))
    assert reply.personal and all(head(k) for k in reply.personal)
    assert reply.weights and not any(head(k) for k in reply.weights)
    assert set(reply.weights) | set(reply.personal) == set(g0)
    # phase 1 trains the head only, phase 2 the body only
    (_, kw1), (_, kw2) = spy.calls
    names = [n for n, _ in build().named_parameters()]
    assert {n for n in names if kw1["trainable"](n)} == {n for n in names if head(n)}
    assert {n for n in names if kw2["trainable"](n)} == {n for n in names if not head(n)}
    assert not torch.equal(reply.weights["encoders.0.0.weight"], g0["encoders.0.0.weight"])
    assert not torch.equal(reply.personal["head.weight"], g0["head.weight"])
    # personalised = global body + the site's head
    new = s.aggregate(g0, [(reply.weights, 4)])
    p = s.personalized_weights(trainer, new, reply.personal, derive_generator(0, 1))
    assert same(p, reply.personal, reply.personal) and same(p, new, reply.weights)


# --- APFL ---------------------------------------------------------------------------------------


def test_apfl_mixture_by_hand():
    local = {"w": torch.tensor([1.0, 3.0]), "rm": torch.tensor([7.0]), "n": torch.tensor(5)}
    shared = {"w": torch.tensor([5.0, -1.0]), "rm": torch.tensor([0.0]), "n": torch.tensor(9)}
    out = mixture(local, shared, 0.25, params={"w"})
    assert torch.allclose(out["w"], torch.tensor([0.25 * 1 + 0.75 * 5, 0.25 * 3 + 0.75 * -1]))
    assert out["rm"].item() == 7.0 and out["n"].item() == 5  # buffers are the local model's


def test_apfl_mixed_forward_gradients_by_hand():
    """Loss = Σ f(x; v̄) for a linear f: ∂/∂v = α·∂/∂v̄, ∂/∂α = ⟨v − w, ∂/∂v̄⟩."""
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.5)
    shared = {"weight": torch.tensor([[3.0, -1.0]]), "bias": torch.tensor([1.5])}
    alpha = torch.tensor(0.25, requires_grad=True)
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    out = mixed_forward(model, shared, alpha)(x)
    # v̄ = 0.25·[1, 2] + 0.75·[3, −1] = [2.5, −0.25]; b̄ = 0.25·0.5 + 0.75·1.5 = 1.25
    assert torch.allclose(out, torch.tensor([[2.5 - 0.25 + 1.25], [5.0 + 1.25]]))
    out.sum().backward()
    d_mix_w, d_mix_b = torch.tensor([[3.0, 1.0]]), torch.tensor([2.0])  # Σ_x x, and the batch size
    assert torch.allclose(model.weight.grad, 0.25 * d_mix_w)
    assert torch.allclose(model.bias.grad, 0.25 * d_mix_b)
    expected = ((model.weight.detach() - shared["weight"]) * d_mix_w).sum() + ((0.5 - 1.5) * d_mix_b).sum()
    assert torch.allclose(alpha.grad, expected)


def test_apfl_client_round_and_personalised_model():
    s = build_strategy("apfl", {"apfl_alpha": 0.25})
    g0 = init(Odd)
    trainer = trainer_for(Odd)
    reply = s.client_round(trainer, g0, {}, derive_generator(0, 1))
    assert reply.personal[ALPHA].item() == 0.25 and reply.personal[ALPHA].dim() == 0
    assert set(reply.weights) == set(g0) and ALPHA not in reply.weights
    assert not same(reply.personal, reply.weights, ["foo.weight"])  # v trained apart from w
    g1 = s.aggregate(g0, [(reply.weights, 6)])
    p = s.personalized_weights(trainer, g1, reply.personal, None)
    for k in ("foo.weight", "foo.bias", "x.weight", "bar.weight"):
        assert torch.allclose(p[k], 0.25 * reply.personal[k] + 0.75 * g1[k])
    assert same(p, reply.personal, ["x.running_mean", "x.running_var", "x.num_batches_tracked"])
    assert ALPHA not in p and set(p) == set(g0)


def test_apfl_learned_alpha_moves_and_stays_in_the_unit_interval():
    g0 = init(Odd)
    learned = build_strategy("apfl", {"apfl_alpha": 0.5, "apfl_learn_alpha": True})
    alpha = learned.client_round(trainer_for(Odd), g0, {}, derive_generator(0, 1)).personal[ALPHA]
    assert alpha.dim() == 0 and alpha.item() != 0.5 and 0.0 <= alpha.item() <= 1.0
    # a huge learning rate would throw α far outside; the projection after every step keeps it in
    seen = []
    trainer = trainer_for(Odd, lr=10.0)
    original = trainer.train

    def watch(weights, generator, **kw):
        project = kw["after_step"]
        alpha_t = kw["extra_params"][0]
        kw["after_step"] = lambda: (project(), seen.append(alpha_t.item()))
        return original(weights, generator, **kw)

    trainer.train = lambda w, g, **kw: watch(w, g, **kw) if kw.get("extra_params") else original(w, g, **kw)
    learned.client_round(trainer, g0, {}, derive_generator(0, 1))
    assert len(seen) == 2 and all(0.0 <= a <= 1.0 for a in seen)


# --- Local, Centralized, FedAvgFT ---------------------------------------------------------------


def test_local_sends_nothing_and_the_global_model_stays_initial():
    s = build_strategy("local")
    g0 = init(Odd)
    trainer = trainer_for(Odd)
    r1 = s.client_round(trainer, g0, {}, derive_generator(0, 1))
    assert r1.weights == {} and r1.num_samples == 6 and set(r1.personal) == set(g0)
    assert same(s.aggregate(g0, [(r1.weights, 6)]), g0)
    spy = Spy(trainer)
    r2 = s.client_round(trainer, g0, r1.personal, derive_generator(0, 2))
    assert same(spy.calls[0][0], r1.personal)  # continues from its own model, not from θ^0
    assert s.personalized_weights(trainer, g0, r2.personal, None) is r2.personal
    assert not s.federated and s.models == ("personalized",)


def test_centralized_is_pooled_and_not_federated():
    c = STRATEGIES["centralized"]
    assert c.pooled and not c.federated and c.models == ("global",)
    assert not any(STRATEGIES[n].pooled for n in STRATEGIES if n != "centralized")


def test_fedavgft_does_not_touch_the_global_weights():
    g0 = init(Odd)
    before = {k: v.clone() for k, v in g0.items()}
    trainer = trainer_for(Odd)
    s = build_strategy("fedavgft", {"finetune_epochs": 2})
    spy = Spy(trainer)
    tuned = s.personalized_weights(trainer, g0, {}, derive_generator(0, 1))
    assert same(g0, before)
    assert spy.calls[0][1]["epochs"] == 2
    assert not torch.equal(tuned["foo.weight"], g0["foo.weight"])
    assert all(tuned[k].data_ptr() != g0[k].data_ptr() for k in g0)
    assert build_strategy("fedavgft", {"finetune_epochs": 0}).personalized_weights(trainer, g0, {}, None) is None


# --- FedPer -------------------------------------------------------------------------------------


def test_fedper_trains_body_and_head_jointly_and_keeps_the_head():
    build = lambda: UNet(3, 2, 4, 2)  # noqa: E731
    head = lambda k: k.startswith(("decoders.1.", "head."))  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4, 8, 8), generator=g)
    trainer = LocalTrainer(build, x, y, TrainSettings(batch_size=2))
    g0 = init(build)
    spy = Spy(trainer)
    s = build_strategy("fedper")
    reply = s.client_round(trainer, g0, {}, derive_generator(0, 1))
    ((_, kw),) = spy.calls  # one phase, every parameter trainable
    assert "trainable" not in kw
    # hand computation: exactly plain local training from θ, split into sent body and kept head
    plain = LocalTrainer(build, x, y, TrainSettings(batch_size=2)).train(g0, derive_generator(0, 1)).weights
    assert same(reply.weights, plain) and same(reply.personal, plain)
    assert reply.personal and all(head(k) for k in reply.personal)
    assert reply.weights and not any(head(k) for k in reply.weights)
    assert set(reply.weights) | set(reply.personal) == set(g0)
    # next round: the new global body with the site's own head substituted; personalised likewise
    new = s.aggregate(g0, [(reply.weights, 4)])
    spy2 = Spy(trainer)
    s.client_round(trainer, new, reply.personal, derive_generator(0, 2))
    start = spy2.calls[0][0]
    assert same(start, reply.personal, reply.personal) and same(start, new, reply.weights)
    p = s.personalized_weights(trainer, new, reply.personal, derive_generator(0, 2))
    assert same(p, reply.personal, reply.personal) and same(p, new, reply.weights)


# --- every registered strategy through the in-process runner ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_runs_end_to_end(tmp_path_factory, name):
    from iopfl.engine.local import in_process_run

    cache = tmp_path_factory.getbasetemp() / "strategy-cache"
    results = in_process_run(
        tiny_config(cache, [f"fl.method={name}", "fl.rounds=2", "model.width=4"]), tmp_path_factory.mktemp(name)
    ).run()
    assert results["method"] == name and results["federated"] == STRATEGIES[name].federated
    assert set(results["models"]) == set(STRATEGIES[name].models)
    for entry in results["models"].values():
        assert len(entry["sites"]) == 3 and 0.0 <= entry["mean"]["dice"] <= 1.0


@pytest.mark.slow
def test_a_new_strategy_needs_only_its_class_and_a_registry_entry(tmp_path, monkeypatch):
    """The config, the runner and the results accept a strategy they were never told about, and its
    own parameter: declared next to its rule, validated as ``fl.<param>`` for that method only."""
    from pydantic import Field

    from iopfl.engine.local import in_process_run
    from iopfl.errors import UserError
    from iopfl.fl.base import Strategy, StrategyParams

    class KeepOneParams(StrategyParams):
        keep: int = Field(0, ge=0, description="index of the reply the server keeps")

    class KeepOne(Strategy):
        """Server keeps one reply's weights (a rule no built-in strategy has)."""

        name = "keepone"
        Params = KeepOneParams

        def aggregate(self, global_weights, replies):
            kept.append(self.params.keep)
            return replies[self.params.keep][0]

    kept: list[int] = []
    monkeypatch.setitem(STRATEGIES, KeepOne.name, KeepOne)
    cache = tmp_path / "cache"
    base = ["fl.method=keepone", "fl.rounds=2", "model.width=4"]
    results = in_process_run(tiny_config(cache, [*base, "fl.keep=2"]), tmp_path / "run").run()
    assert results["method"] == "keepone" and set(results["models"]) == {"global"}
    assert kept == [2, 2]
    assert "keep: 2" in (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(UserError, match=r"fl\.keep.*greater than or equal to 0"):
        tiny_config(cache, [*base, "fl.keep=-1"])
    with pytest.raises(UserError, match=r"fl\.keep.*not a parameter of method 'fedavg'"):
        tiny_config(cache, ["fl.method=fedavg", "fl.keep=1"])
