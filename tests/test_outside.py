"""Outside personalization end to end: leave-one-site-out run → iopfl adapt / predict."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from _tiny import tiny_config
from iopfl.adapt import METHODS, build_method
from iopfl.commands.adapt import adapt_cases, adapt_runtime, assemble, batches_of, run_adapt
from iopfl.commands.predict import run_predict
from iopfl.commands.runs import open_run
from iopfl.config import load_config
from iopfl.data import load_dataset
from iopfl.engine.local import in_process_run
from iopfl.errors import UserError
from iopfl.evaluation.evaluate import score_case
from iopfl.evaluation.metrics import summarize_cases

pytestmark = pytest.mark.slow


def iopfl_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``iopfl ARGS`` in a fresh interpreter, as a user runs it (output captured)."""
    return subprocess.run([sys.executable, "-m", "iopfl.cli", *args], capture_output=True, text=True, timeout=timeout)


def train_without(site: str, rounds: int, root: Path):
    """IOP-FL on four tiny sites with ``site`` held out: (config, root of ``run/`` and ``cache/``)."""
    cfg = tiny_config(root / "cache", [f"data.holdout={site}", f"fl.rounds={rounds}"], sites=4)
    in_process_run(cfg, root / "run").run()
    return cfg, root


@pytest.fixture(scope="module")
def holdout_run(tmp_path_factory):
    return train_without("SiteC", 2, tmp_path_factory.mktemp("outside"))


def test_holdout_site_is_not_trained_on(holdout_run):
    cfg, root = holdout_run
    run = open_run(root / "run")
    assert run.sites == ["SiteA", "SiteB", "SiteD"]
    assert len(run.experts()) == 4


def test_adapt_all_methods_on_the_held_out_site(holdout_run, tmp_path):
    cfg, root = holdout_run
    results = run_adapt(root / "run", "SiteC", "all", tmp_path / "out", [])
    assert set(results.models) == {"global", "bn", "tent", "ensemble", "iopfl"}
    for entry in results.models.values():
        assert 0 <= entry.sites["SiteC"].dice <= 1
    n_cases = len(load_dataset(cfg.data).sites["SiteC"].all_cases())
    for method in results.models:
        assert len(list((tmp_path / "out" / method).glob("*.nii.gz"))) == n_cases
    assert (tmp_path / "out" / "results.json").exists()


def test_no_method_reads_labels(holdout_run, tmp_path):
    """Every outside method writes bit-identical masks with the true labels, with poisoned labels and
    with no labels at all: labels are only ever used to score."""
    cfg, root = holdout_run
    run = open_run(root / "run")
    methods = list(METHODS)
    rng = np.random.default_rng(0)
    outputs = {}
    for labels in ("true", "poisoned", "none"):
        cases = load_dataset(cfg.data).sites["SiteC"].all_cases()
        for case in cases:
            if labels == "poisoned":
                case.mask = rng.integers(0, 2, size=case.mask.shape).astype(np.uint8)
            elif labels == "none":
                case.mask = None
        scores = adapt_cases(run, cases, methods, tmp_path / labels, cfg, adapt_runtime(cfg)).models
        assert set(scores) == (set() if labels == "none" else set(methods))
        # masks, per-batch traces (losses, safeguard signals and fallbacks) and gates
        outputs[labels] = {
            p.relative_to(tmp_path / labels): p.read_bytes()
            for p in sorted((tmp_path / labels).rglob("*"))
            if p.suffix in (".gz", ".jsonl", ".json")
        }
    assert len(outputs["true"]) == len(methods) * len(cases) + 2 + 1  # + tent's and iopfl's traces, gates
    assert outputs["true"] == outputs["poisoned"] == outputs["none"]


def test_routing_needs_a_published_expert(holdout_run, tmp_path):
    """In-process, fl.publish_personal=false publishes nothing: routing and the ensemble are refused
    before anything is written; the methods that need no personal model still run."""
    cfg, root = holdout_run
    private = tiny_config(root / "cache", ["data.holdout=SiteC", "fl.rounds=1", "fl.publish_personal=false"], sites=4)
    results = in_process_run(private, tmp_path / "run").run()
    assert results["published"] == [] and not (tmp_path / "run" / "experts").exists()
    for method in ("iopfl", "ensemble", "all"):
        with pytest.raises(UserError, match="publish-personal='true'.*fl.publish_personal=true"):
            run_adapt(tmp_path / "run", "SiteC", method, tmp_path / "out", [])
        assert not (tmp_path / "out").exists()
    assert set(run_adapt(tmp_path / "run", "SiteC", "bn", tmp_path / "out", []).models) == {"bn"}


def test_unlabelled_nifti_folder_keeps_shape_and_affine(holdout_run, tmp_path):
    cfg, root = holdout_run
    src = next(p for p in (root / "cache").glob("synthetic-*/SiteC"))
    folder = tmp_path / "scans"
    folder.mkdir()
    for p in sorted(src.glob("Case0[01].nii.gz")):
        shutil.copy(p, folder / p.name)
    results = run_adapt(root / "run", str(folder), "iopfl", tmp_path / "out", [])
    assert results.models == {}
    for p in sorted(folder.glob("*.nii.gz")):
        pred = nib.load(str(tmp_path / "out" / "iopfl" / p.name))
        ref = nib.load(str(p))
        assert pred.shape == ref.shape
        assert np.allclose(pred.affine, ref.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_predict_writes_masks(holdout_run, tmp_path):
    cfg, root = holdout_run
    src = next(p for p in (root / "cache").glob("synthetic-*/SiteA"))
    written = run_predict(root / "run", "SiteA", [src / "Case00.nii.gz"], tmp_path / "pred", "personalized")
    assert len(written) == 1 and written[0].exists()
    assert nib.load(str(written[0])).shape == nib.load(str(src / "Case00.nii.gz")).shape


@pytest.mark.parametrize("problem", ["no-checkpoint", "empty-folder", "unreadable", "trained-site", "bad-method"])
def test_bad_adapt_inputs(holdout_run, tmp_path, problem):
    cfg, root = holdout_run
    run, target, method = root / "run", "SiteC", "iopfl"
    if problem == "no-checkpoint":
        run = tmp_path / "copy"
        shutil.copytree(root / "run", run, ignore=shutil.ignore_patterns("checkpoints"))
    elif problem == "empty-folder":
        target = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
    elif problem == "unreadable":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "x.nii.gz").write_bytes(b"not a nifti at all")
        target = str(tmp_path / "bad")
    elif problem == "trained-site":
        target = "SiteA"
    else:
        method = "magic"
    with pytest.raises(UserError):
        run_adapt(run, target, method, tmp_path / "out", [])
    assert not (tmp_path / "out" / "results.json").exists()


def test_cli_adapt_prints_the_table(holdout_run, tmp_path):
    cfg, root = holdout_run
    done = iopfl_cli("adapt", str(root / "run"), "--target", "SiteC", "--method", "all", "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    for method in ("global", "bn", "tent", "ensemble", "iopfl"):
        assert f"| {method} | Dice %" in done.stdout


def _routed_conv_count(run):
    from torch import nn

    return sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in run.build()().modules())


def test_cli_adapt_iopfl_writes_the_gates(holdout_run, tmp_path):
    cfg, root = holdout_run
    done = iopfl_cli("adapt", str(root / "run"), "--target", "SiteC", "--method", "iopfl", "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "o" / "gates.json").read_text())
    assert (tmp_path / "o" / "gates.png").stat().st_size > 0
    run = open_run(root / "run")
    assert summary["experts"] == ["global", "SiteA", "SiteB", "SiteD"]
    gates = np.array(summary["mean_gates"])
    assert gates.shape == (_routed_conv_count(run), 4) == (len(summary["layers"]), 4)
    assert ((gates > 0) & (gates < 1)).all()


def test_gates_sum_to_one_with_the_sum_norm(holdout_run, tmp_path):
    cfg, root = holdout_run
    results = run_adapt(root / "run", "SiteC", "iopfl", tmp_path / "o", ["adapt.gate_norm=sum"])
    assert "iopfl" in results.models
    gates = np.array(json.loads((tmp_path / "o" / "gates.json").read_text())["mean_gates"])
    assert ((gates > 0) & (gates < 1)).all()
    assert np.allclose(gates.sum(axis=1), 1.0, atol=1e-6)


@pytest.fixture(scope="module")
def holdout_b(tmp_path_factory):
    """SiteB held out (SiteC's tiny masks are empty, so Dice there cannot tell settings apart)."""
    return train_without("SiteB", 3, tmp_path_factory.mktemp("outside-b"))


def test_one_slice_at_a_time_stays_close_to_batches_of_four(holdout_b):
    cfg, root = holdout_b
    run = open_run(root / "run")
    cases = load_dataset(cfg.data).sites["SiteB"].all_cases()
    dice, foreground = {}, {}
    for batch in (4, 1):  # 4 slices per case: batch 4 = BN-adapt over the whole case
        c = load_config(root / "run" / "config.yaml", [f"adapt.batch_size={batch}"])
        batches, owners = batches_of(cases, run.network["context"], batch)
        for m in ("bn", "iopfl"):
            preds = assemble(
                build_method(m, run.experts(), run.build(), c.adapt).adapt_and_predict(batches), owners, cases
            )
            scores = [score_case(p, k, run.network["regions"]) for p, k in zip(preds, cases, strict=True)]
            dice[batch, m] = summarize_cases(scores)["dice"]
            foreground[batch, m] = np.mean([p.mean() for p in preds])
    for m in ("bn", "iopfl"):
        # measured: bn 43.8 at batch 1 against 43.0 at batch 4, iopfl 50.0 against 55.7 (bn 40.6, iopfl 53.7 with
        # each slice normalised over itself, adapt.min_batch_stats=1)
        assert dice[1, m] > dice[4, m] - 0.1
        assert 0.25 * foreground[4, m] < foreground[1, m] < 4 * foreground[4, m]  # neither empty nor flooded


@pytest.mark.parametrize("method", ["tent", "iopfl"])
def test_safeguard_stops_a_collapse(holdout_b, tmp_path, method):
    """adapt.lr=1 drives the unlabelled objective to an empty prediction (measured on this run: tent and
    iopfl 0.0 % Dice against BN-adapt's 43.0 %). With the safeguard on (the default) the method ends
    within a point of BN-adapt and the fallbacks are reported; off, the same setting collapses."""
    cfg, root = holdout_b
    guarded = run_adapt(root / "run", "SiteB", "all", tmp_path / "on", ["adapt.lr=1"])
    bn = guarded.models["bn"].mean.dice
    assert bn > 0.2
    assert guarded.models[method].mean.dice >= bn - 0.01
    report = guarded.safeguard[method]
    assert report.fallbacks > 0 and sum(report.reasons.values()) == report.fallbacks
    assert set(guarded.safeguard) == {"tent", "iopfl"}  # every adaptive method, no other
    assert f"| {method} |" in (tmp_path / "on" / "report.md").read_text().split("Safeguard")[1]
    trace = [json.loads(line) for line in (tmp_path / "on" / method / "trace.jsonl").read_text().splitlines()]
    assert sum("fallback" in t for t in trace) == report.fallbacks
    if method == "iopfl":
        assert json.loads((tmp_path / "on" / "gates.json").read_text())["safeguard"] == report.dump()

    unguarded = run_adapt(root / "run", "SiteB", method, tmp_path / "off", ["adapt.lr=1", "adapt.safeguard=false"])
    assert unguarded.models[method].mean.dice < bn - 0.2
    assert unguarded.safeguard == {}


def test_cli_adapt_warns_when_the_safeguard_fell_back(holdout_b, tmp_path):
    cfg, root = holdout_b
    done = iopfl_cli(
        "adapt",
        str(root / "run"),
        "--target",
        "SiteB",
        "--method",
        "tent",
        "--out",
        str(tmp_path / "o"),
        "-o",
        "adapt.lr=1",
    )
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "safeguard" in line]
    assert warning and "tent:" in " ".join(warning)
    quiet = iopfl_cli("adapt", str(root / "run"), "--target", "SiteB", "--method", "bn", "--out", str(tmp_path / "q"))
    assert quiet.returncode == 0 and "safeguard" not in quiet.stderr


def test_adapt_uses_todays_test_time_defaults_not_the_runs_recorded_ones(holdout_run, tmp_path):
    """A run trained before outside safety recorded unguarded sigmoid gates in its adapt section."""
    from types import SimpleNamespace

    from iopfl.commands.adapt import adapt_config

    cfg, root = holdout_run
    old = tmp_path / "run"
    old.mkdir()
    tree = yaml.safe_load((root / "run" / "config.yaml").read_text())
    tree["adapt"] = {"gate_norm": "sigmoid", "safeguard": False, "lr": 0.5}
    (old / "config.yaml").write_text(yaml.safe_dump(tree))
    resolved = adapt_config(SimpleNamespace(path=old), ["adapt.batch_size=2"])
    assert resolved.adapt.safeguard is True and resolved.adapt.gates == "softmax" and resolved.adapt.lr == 1e-3
    assert resolved.adapt.batch_size == 2 and resolved.data == cfg.data


def test_2d_images_are_packed_into_batches_volumes_are_not():
    from iopfl.data import Case

    def case(i, slices):
        return Case(
            site="S",
            case_id=f"c{i}",
            image=np.full((slices, 1, 4, 4), i, np.float32),
            mask=None,
            spacing=(1.0, 1.0, 1.0),
            source="folder",
        )

    cases = [case(0, 1), case(1, 1), case(2, 1), case(3, 3), case(4, 1)]
    batches, owners = batches_of(cases, 0, 2)
    assert owners == [[0, 1], [2], [3, 3], [3], [4]]  # a volume flushes the images before it
    assert [b.shape[0] for b in batches] == [2, 1, 2, 1, 1]
    assert batches[0][:, 0, 0, 0].tolist() == [0.0, 1.0] and batches[2][:, 0, 0, 0].tolist() == [3.0, 3.0]


def test_adapt_applies_the_runtime_section(holdout_run, tmp_path):
    """`iopfl adapt` resolves and applies its runtime once: one thread computes, in fp32 (adaptation has
    no mixed precision, whatever runtime.precision says), as its results record."""
    cfg, root = holdout_run
    done = iopfl_cli(
        "adapt",
        str(root / "run"),
        "--target",
        "SiteC",
        "--method",
        "bn",
        "--out",
        str(tmp_path / "o"),
        "-o",
        "runtime.threads=1",
        "-o",
        "runtime.precision=bf16",
    )
    assert done.returncode == 0, done.stderr
    compute = json.loads((tmp_path / "o" / "results.json").read_text())["compute"]
    assert compute["threads"] == 1 and compute["precision"] == "fp32" and compute["device"] == "cpu"
