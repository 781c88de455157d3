"""``iopfl export`` and ``iopfl predict --model-file``: the exported ONNX and TorchScript files compute what
the PyTorch model computes (random inputs of other batch and spatial sizes, real samples), say in their
metadata how to prepare inputs, and bad input ends in one message."""

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from _tiny import tiny_config
from iopfl import cli
from iopfl.commands.export import export_run_model, load_exported, predict_with_file
from iopfl.commands.predict import run_predict, selected_weights
from iopfl.commands.runs import open_run
from iopfl.data import case_inputs, load_dataset, source_of
from iopfl.data.images2d import image_to_case
from iopfl.engine.local import in_process_run
from iopfl.errors import UserError
from iopfl.models.routing import load_expert

pytestmark = pytest.mark.slow
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOLERANCE = 1e-4  # max |Δ probability| in fp32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny two-round IOP-FL run whose sites published their models."""
    root = tmp_path_factory.mktemp("export")
    in_process_run(tiny_config(root / "cache", ["fl.rounds=2"]), root / "run").run()
    return root / "run"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """(format, model) → the exported file, each written once for the module."""
    folder = tmp_path_factory.mktemp("files")
    files = {}
    for fmt, suffix in (("onnx", "onnx"), ("torchscript", "pt")):
        for model in ("global", "personalized"):
            files[fmt, model] = folder / f"SiteB-{model}.{suffix}"
            export_run_model(run, "SiteB", model, fmt, files[fmt, model])
    return files


def reference(run: Path, model: str) -> torch.nn.Module:
    trained = open_run(run)
    return load_expert(trained.build(), selected_weights(trained, "SiteB", model, None), 0).eval()


def runner(path: Path, fmt: str):
    """The file as a function ``[B, C, H, W]`` array → logits, through its own runtime only."""
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"image": x})[0]
    scripted = torch.jit.load(str(path))
    return lambda x: scripted(torch.from_numpy(x)).detach().numpy()


def real_samples(run: Path) -> list[np.ndarray]:
    """Network inputs of real data: slices of a synthetic test volume as iopfl prepares them, and a
    Kvasir-SEG polyp frame (z-scored RGB at the run's size) where ../shared/data has it."""
    trained = open_run(run)
    case = load_dataset(trained.cfg.data).sites["SiteB"].test[0]
    samples = [case_inputs(case, trained.network["context"]).numpy()]
    frames = SHARED / "Kvasir-SEG" / "images"
    if frames.is_dir():
        frame = sorted(frames.iterdir())[0]
        samples.append(image_to_case("Kvasir-SEG", frame.stem, frame, None, trained.network["image_size"]).image)
    return samples


@pytest.mark.parametrize("model", ["global", "personalized"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_probabilities_match_pytorch(run, exported, fmt, model):
    net, forward = reference(run, model), runner(exported[fmt, model], fmt)
    generator = np.random.default_rng(0)
    inputs = [
        generator.standard_normal(shape, dtype=np.float32)  # dynamic batch and spatial axes
        for shape in ((1, 3, 32, 32), (5, 3, 32, 32), (2, 3, 48, 80))
    ]
    for x in inputs + real_samples(run):
        with torch.no_grad():
            expected = net(torch.from_numpy(x)).softmax(dim=1)
        got = torch.from_numpy(forward(x)).softmax(dim=1)
        assert got.shape == expected.shape == (x.shape[0], 2, *x.shape[2:])
        assert (got - expected).abs().max().item() <= TOLERANCE


def test_personalized_and_global_files_differ(run, exported):
    """The two exports hold different weights (else the test above could not tell them apart)."""
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    gap = np.abs(runner(exported["onnx", "global"], "onnx")(x) - runner(exported["onnx", "personalized"], "onnx")(x))
    assert gap.max() > 1e-3


def test_real_kvasir_frame_is_used_when_present(run):
    assert len(real_samples(run)) == (2 if (SHARED / "Kvasir-SEG" / "images").is_dir() else 1)


def test_metadata_records_preprocessing_and_classes(exported):
    props = {p.key: p.value for p in onnx.load(str(exported["onnx", "personalized"])).metadata_props}
    meta = json.loads(props["iopfl"])
    extra = {"iopfl.json": ""}
    torch.jit.load(str(exported["torchscript", "personalized"]), _extra_files=extra)
    assert json.loads(extra["iopfl.json"]) == meta
    assert (meta["site"], meta["model"], meta["method"], meta["dataset"]) == (
        "SiteB",
        "personalized",
        "iopfl",
        "synthetic",
    )
    i = meta["input"]
    shape = (i["image_size"], i["channels"], i["stored_channels"], i["context"], i["spatial_multiple"])
    assert shape == (32, 3, 1, 1, 4)
    assert i["preprocessing"]["normalisation"]["clip_percentiles"] == [0.5, 99.5]
    assert "2.5D" in i["preprocessing"]["stacking"]
    assert meta["class_names"] == ["background", "prostate"] and meta["output"]["num_classes"] == 2


def test_onnx_axes_are_named_dynamic(exported):
    graph = onnx.load(str(exported["onnx", "global"])).graph
    for value in (graph.input[0], graph.output[0]):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims[0] == "batch" and dims[2:] == ["height", "width"]


@pytest.mark.parametrize(
    "source, names", [("fundus", ("background", "rim", "cup")), ("folder", ("background", "foreground"))]
)
def test_class_names_are_the_label_values_meaning(source, names):
    # fundus masks: 0 cup, 128 rim (disc minus cup), 255 background, read as labels 2, 1, 0
    assert source_of(source).class_names == names


def test_a_source_with_too_few_class_names_is_refused():
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        replace(source_of("folder"), num_classes=3)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_predict_with_a_model_file_writes_the_runs_masks(run, exported, tmp_path, fmt):
    scan = next((run.parent / "cache").glob("synthetic-*/SiteB")) / "Case00.nii.gz"
    from_run = run_predict(run, "SiteB", [scan], tmp_path / "run", "personalized", device="cpu")
    from_file = predict_with_file(exported[fmt, "personalized"], [scan], tmp_path / fmt)
    assert [p.name for p in from_file] == [p.name for p in from_run]
    a, b = (nib.load(str(p[0])) for p in (from_run, from_file))
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)


def run_cli(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["iopfl", *map(str, argv)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_cli_export_then_predict(run, tmp_path, monkeypatch, capsys):
    code, err = run_cli(
        ["export", run, "--site", "SiteA", "--model", "global", "--format", "torchscript", "--out", tmp_path / "a.pt"],
        monkeypatch,
        capsys,
    )
    assert code == 0 and "background, prostate" in err
    scan = next((run.parent / "cache").glob("synthetic-*/SiteA")) / "Case01.nii.gz"
    code, err = run_cli(
        ["predict", scan, "--model-file", tmp_path / "a.pt", "--out", tmp_path / "masks"], monkeypatch, capsys
    )
    assert code == 0 and (tmp_path / "masks" / "Case01.nii.gz").exists()


def unpublished(run: Path, tmp_path: Path) -> Path:
    """A copy of the run in which no site published its personalised model."""
    copy = tmp_path / "private"
    shutil.copytree(run, copy)
    results = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text(json.dumps({**results, "published": []}))
    return copy


@pytest.mark.parametrize(
    "problem, needle",
    [
        ("unknown-site", "SiteZ"),
        ("unpublished", "did not publish"),
        ("parent-is-a-file", "is a file"),
        ("out-is-a-folder", "is a folder"),
        ("bad-format", "--format"),
        ("bad-model", "--model"),
        ("no-run", "norun"),
    ],
)
def test_bad_export_input_is_one_line_exit_2(run, tmp_path, monkeypatch, capsys, problem, needle):
    args = {"run": run, "--site": "SiteA", "--model": "personalized", "--format": "onnx", "--out": tmp_path / "m.onnx"}
    if problem == "unknown-site":
        args["--site"] = "SiteZ"
    elif problem == "unpublished":
        args["run"] = unpublished(run, tmp_path)
    elif problem == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        args["--out"] = tmp_path / "file" / "m.onnx"
    elif problem == "out-is-a-folder":
        args["--out"] = tmp_path
    elif problem == "bad-format":
        args["--format"] = "tflite"
    elif problem == "bad-model":
        args["--model"] = "best"
    else:
        args["run"] = tmp_path / "norun"
    before = sorted(tmp_path.rglob("*"))
    code, err = run_cli(["export", args.pop("run"), *[str(v) for kv in args.items() for v in kv]], monkeypatch, capsys)
    assert code == 2 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # one message (rich may wrap it)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("content", [b"not a model", b""])
def test_a_file_that_is_not_an_export_is_refused(tmp_path, content):
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(UserError, match="m.onnx"):
        load_exported(path)


def test_torchscript_without_iopfl_metadata_is_refused(tmp_path):
    torch.jit.save(torch.jit.trace(torch.nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 4, 4)), str(tmp_path / "x.pt"))
    with pytest.raises(UserError, match="no iopfl metadata"):
        load_exported(tmp_path / "x.pt")


def test_predict_refuses_run_options_with_a_model_file(exported, tmp_path, monkeypatch, capsys):
    code, err = run_cli(
        [
            "predict",
            tmp_path,
            "--model-file",
            exported["torchscript", "global"],
            "--site",
            "SiteA",
            "--out",
            tmp_path / "o",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "--model-file" in err


def test_a_missing_onnx_package_names_the_extra(run, tmp_path, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find(name, *a))
    with pytest.raises(UserError, match=r"onnxscript.*\[export\]"):
        export_run_model(run, "SiteA", "global", "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_an_input_of_the_wrong_kind_for_the_model_is_refused(exported, tmp_path):
    """The volume model (1 channel × 3 slices) given an RGB image: one message naming the file."""
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(UserError, match=r"photo\.png.*9 input channels.*takes 3"):
        predict_with_file(exported["torchscript", "global"], [tmp_path / "photo.png"], tmp_path / "o")
    assert not (tmp_path / "o").exists()
