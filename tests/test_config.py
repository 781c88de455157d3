"""Config loading, overrides and validation errors."""

import pytest

from iopfl.config import CONFIG_DIR, load_config, parse_overrides
from iopfl.errors import UserError


def test_shipped_configs_validate():
    for name in ("demo", "prostate", "prostate-cpu", "fundus", "polyp"):
        cfg = load_config(CONFIG_DIR / f"{name}.yaml")
        assert cfg.fl.rounds > 0


def test_overrides_are_typed():
    cfg = load_config(
        CONFIG_DIR / "demo.yaml", ["fl.rounds=3", "fl.alpha=0.5", "fl.method=iopfl", "data.sites=[SiteA, SiteB]"]
    )
    assert (cfg.fl.rounds, cfg.fl.alpha, cfg.fl.method) == (3, 0.5, "iopfl")
    assert cfg.data.sites == ["SiteA", "SiteB"]
    assert parse_overrides(["a.b=x=y"]) == [("a.b", "x=y")]


@pytest.mark.parametrize(
    "override, key",
    [
        ("fl.rounds=0", "fl.rounds"),
        ("fl.rounds=-2", "fl.rounds"),
        ("fl.alpha=1.5", "fl.alpha"),
        ("fl.method=fedmagic", "fl.method"),
        ("fl.bogus=1", "fl.bogus"),
        ("nonsense=1", "nonsense"),
        ("train.batch_size=abc", "train.batch_size"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(CONFIG_DIR / "demo.yaml", [override])


def test_method_parameters_are_validated_against_the_chosen_method():
    prox = load_config(CONFIG_DIR / "demo.yaml", ["fl.method=fedprox", "fl.mu=0.5"])
    assert prox.fl.strategy_params().mu == 0.5 and "mu: 0.5" in prox.to_yaml()
    # the resolved config lists every parameter of the method with its default
    assert load_config(CONFIG_DIR / "demo.yaml", ["fl.method=ditto"]).fl.model_dump()["ditto_lambda"] == 0.1
    assert "alpha" not in load_config(CONFIG_DIR / "demo.yaml", ["fl.method=fedavg"]).fl.model_dump()
    with pytest.raises(UserError, match=r"fl\.alpha.*not a parameter of method 'fedavg'"):
        load_config(CONFIG_DIR / "demo.yaml", ["fl.method=fedavg", "fl.alpha=0.5"])
    with pytest.raises(UserError, match=r"fl\.mu.*greater than or equal to 0"):
        load_config(CONFIG_DIR / "demo.yaml", ["fl.method=fedprox", "fl.mu=-1"])


def test_bad_override_syntax():
    with pytest.raises(UserError, match="key=value"):
        load_config(None, ["fl.rounds"])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fl: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(listy)


def test_digest_changes_with_config():
    a = load_config(CONFIG_DIR / "demo.yaml")
    b = load_config(CONFIG_DIR / "demo.yaml", ["fl.rounds=2"])
    assert a.digest() == load_config(CONFIG_DIR / "demo.yaml").digest() != b.digest()


def test_digest_ignores_the_adapt_section():
    """Test-time settings do not change training: a finished run is re-adapted, an interrupted one resumed."""
    a = load_config(CONFIG_DIR / "demo.yaml")
    assert a.digest() == load_config(CONFIG_DIR / "demo.yaml", ["adapt.lr=0.5", "adapt.seed=3"]).digest()


@pytest.mark.parametrize("capability, expected", [("AVX512", "bf16"), ("AVX2", "fp32"), ("DEFAULT", "fp32")])
def test_auto_precision_uses_bf16_only_where_the_cpu_has_bf16_kernels(monkeypatch, capability, expected):
    import torch

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    from iopfl.runtime import Runtime

    def precision(overrides: list[str]) -> str:
        cfg = load_config(CONFIG_DIR / "demo.yaml", ["runtime.device=cpu", *overrides])
        return cfg.train_settings(Runtime.resolve(cfg.runtime)).precision

    assert precision([]) == expected
    assert precision(["runtime.precision=bf16"]) == "bf16"


@pytest.mark.parametrize("old", ["precision=bf16", "channels_last=true", "threads=1"])
def test_moved_train_keys_name_their_runtime_key(old):
    key = old.split("=")[0]
    with pytest.raises(UserError, match=rf"train\.{key}.*moved: use runtime\.{key}"):
        load_config(CONFIG_DIR / "demo.yaml", [f"train.{old}"])
