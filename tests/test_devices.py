"""The device-sensitive paths, on every device this machine has: CPU always, CUDA when
``torch.cuda.is_available()`` (reported as skipped, with the reason, where there is none). The same
suite run on a GPU machine verifies it."""

import pytest
import torch

from _tiny import interrupt_then_resume, tiny_config
from iopfl.engine.local import in_process_run
from iopfl.fl.training import LocalTrainer, TrainSettings
from iopfl.models import build_model
from iopfl.seeding import derive_generator

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def _samples(n: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(n, size, size, generator=g) > 0.7).long()
    return masks[:, None].float().repeat(1, 3, 1, 1) + 0.3 * torch.randn(n, 3, size, size, generator=g), masks


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_local_training_round_on_each_device(device, precision):
    build = lambda: build_model(3, 2, 4, 2)  # noqa: E731
    images, masks = _samples()
    start = build().state_dict()
    settings = TrainSettings(batch_size=3, precision=precision, device=device, augment=None)
    trainer = LocalTrainer(build, images, masks, settings)
    assert next(trainer.model.parameters()).device.type == device
    result = trainer.train(start, derive_generator(0, "round"))
    assert torch.isfinite(torch.tensor(result.loss)) and result.steps == 2
    # what leaves the trainer is a CPU copy, whatever the device (checkpoints and messages need no GPU)
    assert all(v.device.type == "cpu" for v in result.weights.values())
    assert any(not torch.equal(result.weights[k], start[k]) for k in start if start[k].is_floating_point())
    again = LocalTrainer(build, images, masks, settings).train(start, derive_generator(0, "round"))
    assert all(torch.equal(result.weights[k], again.weights[k]) for k in start)  # deterministic


def test_fp16_keeps_its_gradient_scale_in_the_site_state(device):
    build = lambda: build_model(3, 2, 4, 2)  # noqa: E731
    images, masks = _samples()
    settings = TrainSettings(batch_size=3, precision="fp16", device=device)
    trainer = LocalTrainer(build, images, masks, settings)
    trainer.load_scaler_state({"scale": torch.tensor(1024.0), "growth_tracker": torch.tensor(3)})  # as if lowered
    trainer.train(build().state_dict(), derive_generator(0, "round"))
    state = trainer.scaler_state()
    assert float(state["scale"]) == 1024.0 and int(state["growth_tracker"]) == 3 + 2  # two clean steps
    fresh = LocalTrainer(build, images, masks, settings)
    fresh.load_scaler_state(state)
    assert fresh.scaler.get_scale() == 1024.0


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_is_exact_on_each_device(device, precision, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "cache", [f"runtime.device={device}", f"runtime.precision={precision}"])
    expected = in_process_run(cfg, tmp_path / "whole").run()
    resumed = interrupt_then_resume(cfg, tmp_path / "run", monkeypatch)
    for key in ("models", "last_round", "selection"):
        assert resumed[key] == expected[key]


def _adapt_experts(n: int = 3):
    from iopfl.models import UNet

    torch.manual_seed(0)
    build = lambda: UNet(3, 2, width=4, depth=2)  # noqa: E731
    states = []
    for _ in range(n):
        m = build().train()
        with torch.no_grad():  # running statistics like a trained model's
            m(torch.randn(8, 3, 16, 16))
        states.append(m.state_dict())
    return build, states


@pytest.mark.parametrize("name", ["global", "bn", "tent", "ensemble", "iopfl"])
def test_each_test_time_method_on_each_device(device, name):
    from iopfl.adapt import AdaptConfig, build_method

    build, states = _adapt_experts()
    batches = [torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = AdaptConfig(steps_per_batch=2, seed=3)
    here = build_method(name, states, build, cfg, torch.device(device)).adapt_and_predict(batches)
    again = build_method(name, states, build, cfg, torch.device(device)).adapt_and_predict(batches)
    assert all(p.device.type == "cpu" and p.shape == (3, 2, 16, 16) for p in here)
    assert all(torch.equal(a, b) for a, b in zip(here, again, strict=True))  # deterministic on the device
    if device != "cpu":  # the same method on the CPU: equal up to kernel rounding
        cpu = build_method(name, states, build, cfg).adapt_and_predict(batches)
        assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(here, cpu, strict=True))


def test_routed_convolution_equals_the_per_sample_loop_on_each_device(device):
    import torch.nn.functional as F
    from torch import nn

    from iopfl.models.routing import RoutedConv2d

    torch.manual_seed(0)
    layer = RoutedConv2d([nn.Conv2d(4, 6, 3, padding=1) for _ in range(3)]).to(device)
    x = torch.randn(5, 4, 11, 9, device=device)
    out = layer(x)
    gates = layer.router.last_gates
    naive = torch.cat(
        [
            F.conv2d(
                x[i : i + 1],
                sum(gates[i, e] * layer.weight[e] for e in range(3)),
                sum(gates[i, e] * layer.bias[e] for e in range(3)),
                padding=1,
            )
            for i in range(5)
        ]
    )
    assert torch.allclose(out, naive, atol=1e-5)


@pytest.mark.slow
def test_evaluation_and_predict_on_each_device(device, tmp_path):
    from iopfl.commands.predict import run_predict

    cfg = tiny_config(tmp_path / "cache", ["fl.rounds=1", "runtime.device=cpu"])
    cpu = in_process_run(cfg, tmp_path / "run").run()
    here = in_process_run(
        tiny_config(tmp_path / "cache", ["fl.rounds=1", f"runtime.device={device}"]), tmp_path / "here"
    ).run()
    for model in cpu["models"]:
        assert here["models"][model]["mean"]["dice"] == pytest.approx(cpu["models"][model]["mean"]["dice"], abs=0.02)
    scan = next((tmp_path / "cache").glob("synthetic-*/SiteA/Case00.nii.gz"))
    a = run_predict(tmp_path / "run", "SiteA", [scan], tmp_path / "a", "personalized", device="cpu")
    b = run_predict(tmp_path / "run", "SiteA", [scan], tmp_path / "b", "personalized", device=device)
    assert a[0].name == b[0].name and a[0].exists() and b[0].exists()
