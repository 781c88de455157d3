"""The federation core: a site's reply is checked before aggregation, and one that fails is left out
of the round and logged, exactly like a site that failed."""

import pytest
import torch

from _tiny import tiny_config
from iopfl.engine.federation import Federation
from iopfl.engine.inprocess import InProcessSites
from iopfl.engine.rounds import check_reply, check_weights
from iopfl.engine.rundir import RunDir
from iopfl.fl import ClientReply
from iopfl.fl.aggregation import weighted_average
from iopfl.runtime import Runtime

MODEL = {"conv.weight": torch.zeros(2, 3), "bn.num_batches_tracked": torch.tensor(0)}


@pytest.mark.parametrize(
    "weights, count, needle",
    [
        ({"conv.weight": torch.ones(2, 3)}, 4, None),
        ({"conv.weight": torch.ones(2, 3)}, 0, "sample count 0"),
        ({"conv.weight": torch.ones(3, 2)}, 4, "shape (3, 2)"),
        ({"conv.weight": torch.ones(2, 3, dtype=torch.float64)}, 4, "torch.float64"),
        ({"conv.weight": torch.full((2, 3), float("nan"))}, 4, "non-finite"),
        ({"head.weight": torch.ones(2, 3)}, 4, "'head.weight'"),
    ],
)
def test_check_reply(weights, count, needle):
    reason = check_reply(ClientReply(weights, count), MODEL)
    assert reason is None if needle is None else needle in reason


def test_a_published_model_must_be_the_whole_network():
    assert check_weights({"conv.weight": torch.ones(2, 3)}, MODEL, complete=True).startswith("'bn.num_batches")
    assert check_weights({**MODEL}, MODEL, complete=True) is None


class CorruptSiteB(InProcessSites):
    """SiteB sends non-finite weights in round 2."""

    def fit(self, round_, names, weights):
        for name, reply in super().fit(round_, names, weights):
            if name == "SiteB" and round_ == 2:
                reply.weights = {
                    k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                    for k, v in reply.weights.items()
                }
            yield name, reply


def test_an_invalid_reply_is_left_out_and_logged(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "cache", ["fl.rounds=2", "fl.method=fedavg"])
    aggregated = []
    original = Federation._train_round

    def spy(self, round_):
        original(self, round_)
        aggregated.append({k: v.clone() for k, v in self.global_weights.items()})

    monkeypatch.setattr(Federation, "_train_round", spy)
    sites = CorruptSiteB(cfg, Runtime.resolve(cfg.runtime), RunDir(tmp_path / "run").plots / "overlays")
    seen = {}
    fit = sites.fit

    def recording_fit(round_, names, weights):
        for name, reply in fit(round_, names, weights):
            seen[round_, name] = reply
            yield name, reply

    sites.fit = recording_fit
    results = Federation(cfg, tmp_path / "run", sites).run()
    log = (tmp_path / "run" / "run.log").read_text()
    assert "round 2: site SiteB is left out of training: 'encoders.0.0.weight' holds non-finite values" in log
    # round 2's global model is the sample-weighted mean of A and C alone
    kept = [seen[2, "SiteA"], seen[2, "SiteC"]]
    expected = weighted_average([r.weights for r in kept], [r.num_samples for r in kept])
    assert all(torch.equal(aggregated[1][k], expected[k]) for k in expected)
    assert all(torch.isfinite(v).all() for v in aggregated[1].values() if v.is_floating_point())
    assert results["last_round"]["round"] == 2
