"""``iopfl export``: a run's global or personalised model as one self-describing ONNX or TorchScript
file, and ``iopfl predict --model-file``: segment with such a file, without the run directory.

The file holds the plain U-Net in eval mode (BatchNorm with its running statistics; never the routed
or test-time-BN networks of ``iopfl adapt``) with a dynamic batch axis and dynamic height and width
(multiples of 2**depth), and everything a reader needs to prepare inputs and read outputs: the input
size, channels, normalisation and 2.5D stacking, the class names (docs/EXPORT.md). ONNX stores it as
the JSON value of the ``iopfl`` metadata property, TorchScript as the extra file ``iopfl.json``.
ONNX export uses PyTorch's torch.export-based exporter (the TorchScript-based one is deprecated);
it and onnxruntime come with the ``export`` extra.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iopfl import __version__
from iopfl.commands.predict import predict_inputs, selected_weights
from iopfl.commands.runs import TrainedRun, open_run
from iopfl.data import source_of
from iopfl.errors import UserError
from iopfl.fileio import atomic_write
from iopfl.models.routing import load_expert

FORMATS = ("onnx", "torchscript")
META_KEY = "iopfl"  # ONNX metadata property
EXTRA_FILE = "iopfl.json"  # TorchScript extra file
INPUT_NAME, OUTPUT_NAME = "image", "logits"
PREDICT_BATCH = 8  # slices per forward pass of ``predict --model-file``
EXTRA_HINT = "pip install -e '.[export]' (make venv installs it)"

# How iopfl.data prepares a file for the network (images2d.image_to_case, prostate.volume_to_case,
# data.case_inputs); a reader outside iopfl must do the same.
IMAGE_PREPROCESSING = {
    "input": "2D image (PNG, JPEG, ...)",
    "channels": "RGB; a grey image is replicated to 3 channels",
    "normalisation": {
        "method": "zscore",
        "over": "the whole image, all channels together",
        "clip_percentiles": None,
        "constant_input": "zeros",
    },
    "resize": "bilinear to image_size x image_size (align_corners=False)",
    "stacking": "none: one image is one sample",
}
VOLUME_PREPROCESSING = {
    "input": "NIfTI volume; slices along its third array axis",
    "channels": "one intensity channel per slice",
    "normalisation": {
        "method": "zscore",
        "over": "the whole volume, after clipping to its percentiles",
        "clip_percentiles": [0.5, 99.5],
        "constant_input": "zeros",
    },
    "resize": "each slice bilinear to image_size x image_size (align_corners=False)",
    "stacking": "2.5D: slice z with `context` neighbours on each side (edge slices replicated); "
    "channel = (offset + context) * stored_channels + stored channel, offset in [-context, context]",
}
VOLUME_SOURCES = ("prostate", "synthetic")


def export_metadata(run: TrainedRun, site: str, model: str) -> dict[str, Any]:
    """What the exported file records: its origin, the input it expects and the output it gives."""
    n = run.network
    stored = n["in_channels"] // (2 * n["context"] + 1)
    volumes = run.cfg.data.source in VOLUME_SOURCES
    return {
        "format_version": 1,
        "producer": f"iopfl {__version__}",
        "run": run.path.name,
        "run_key": run.run_key,
        "method": run.cfg.fl.method,
        "dataset": run.cfg.data.source,
        "site": site,
        "model": model,
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "image_size": n["image_size"],
            "channels": n["in_channels"],
            "stored_channels": stored,
            "context": n["context"],
            "spatial_multiple": 2 ** n["depth"],
            "preprocessing": VOLUME_PREPROCESSING if volumes else IMAGE_PREPROCESSING,
        },
        "output": {
            "name": OUTPUT_NAME,
            "layout": "NCHW",
            "num_classes": n["num_classes"],
            "values": "logits: softmax over axis 1 gives the class probabilities, argmax the labels",
        },
        "class_names": list(source_of(run.cfg.data.source).class_names),
        "regions": n["regions"],
    }


def export_run_model(
    run_dir: Path, site: str, model: str, fmt: str, out: Path, state_dir: Path | None = None
) -> dict[str, Any]:
    """``iopfl export``: write ``site``'s val-selected ``model`` of the run as ``fmt`` to ``out``
    (atomically); returns the recorded metadata. Every input is checked before anything is written."""
    if fmt not in FORMATS:
        raise UserError(f"--format: expected {' or '.join(FORMATS)}, got '{fmt}'")
    if fmt == "onnx":
        require("onnx", "onnxscript")
    check_destination(Path(out))
    run = open_run(run_dir)
    net = load_expert(run.build(), selected_weights(run, site, model, state_dir), 0).eval()
    meta = export_metadata(run, site, model)
    size = meta["input"]["image_size"]
    example = torch.randn(2, meta["input"]["channels"], size, size, generator=torch.Generator().manual_seed(0))
    write = write_onnx if fmt == "onnx" else write_torchscript
    try:
        atomic_write(Path(out), lambda tmp: write(net, example, meta, Path(tmp)))
    except OSError as exc:
        raise UserError(f"{out}: cannot write the exported model ({exc.strerror or exc})") from None
    return meta


def check_destination(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a file before the export's work is done."""
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out names the file to write")
    folder = next(p for p in out.parents if p.exists())
    if not folder.is_dir():
        raise UserError(f"{out}: cannot write there, {folder} is a file")


def require(*modules: str) -> None:
    """ONNX export (onnx, onnxscript) and inference (onnxruntime) need the ``export`` extra; say so
    instead of an ImportError."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"ONNX needs the package '{name}': {EXTRA_HINT}")


def write_onnx(net: nn.Module, example: torch.Tensor, meta: dict[str, Any], path: Path) -> None:
    """``net`` as ONNX with dynamic batch, height and width (multiples of ``spatial_multiple``);
    ``example``: a ``[B, C, H, W]`` input to trace with."""
    from torch.export import Dim

    step = meta["input"]["spatial_multiple"]
    shapes = ({0: Dim("batch"), 2: step * Dim("height_blocks"), 3: step * Dim("width_blocks")},)  # forward's one input
    with quiet_exporter():
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=shapes,
            verbose=False,
        )
    assert program is not None  # only the legacy exporter (dynamo=False) returns None
    program.rename_axes({f"{step}*height_blocks": "height", f"{step}*width_blocks": "width"})
    program.model.metadata_props[META_KEY] = json.dumps(meta)
    program.model.doc_string = describe(meta)
    program.save(str(path), external_data=False)


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter logs a warning per missing optional library (torchvision) and PyTorch's pytree
    deprecations: noise to a user exporting a U-Net."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def write_torchscript(net: nn.Module, example: torch.Tensor, meta: dict[str, Any], path: Path) -> None:
    """``net`` traced to TorchScript (the U-Net has no data-dependent control flow, so the trace holds
    for any batch and any height and width divisible by ``spatial_multiple``)."""
    with torch.no_grad():
        traced = torch.jit.trace(net, example)
    torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})


def describe(meta: dict[str, Any]) -> str:
    """One line for model viewers: what the file is and what it expects."""
    i = meta["input"]
    return (
        f"iopfl {meta['method']} {meta['model']} model of site {meta['site']} ({meta['dataset']}): "
        f"input {i['name']} float32 [batch, {i['channels']}, height, width] (trained at {i['image_size']}², "
        f"multiples of {i['spatial_multiple']}), output {meta['output']['name']} over classes "
        f"{', '.join(meta['class_names'])}; preprocessing in metadata '{META_KEY}'"
    )


class OnnxModel(nn.Module):
    """An ONNX Runtime session as a module: ``[B, C, H, W]`` float32 → logits ``[B, K, H, W]`` (CPU)."""

    def __init__(self, path: Path):
        super().__init__()
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 — onnxruntime raises its own exception types for unreadable models
            raise UserError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        self.metadata_map = self.session.get_modelmeta().custom_metadata_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


def load_exported(path: Path, device: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """An exported file as a module in eval mode and its metadata. TorchScript files are zip
    archives, anything else is read as ONNX (which runs on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model file not found")
    if zipfile.is_zipfile(path):
        return load_torchscript(path, device)
    if device not in (None, "cpu"):
        raise UserError(
            f"--device {device}: an ONNX model runs on the CPU here (onnxruntime's CPU build); "
            "export --format torchscript for another device"
        )
    require("onnxruntime")
    net = OnnxModel(path)
    return net.eval(), parse_metadata(path, net.metadata_map.get(META_KEY))


def load_torchscript(path: Path, device: str | None) -> tuple[nn.Module, dict[str, Any]]:
    from iopfl.runtime import Runtime, RuntimeConfig

    extra = {EXTRA_FILE: ""}
    where = Runtime.resolve(RuntimeConfig(device="cpu"), device, "--device").device
    try:
        net = torch.jit.load(str(path), map_location=where, _extra_files=extra)
    except RuntimeError as exc:
        raise UserError(f"{path}: not a readable TorchScript model ({str(exc).splitlines()[0][:200]})") from None
    return net.eval(), parse_metadata(path, extra[EXTRA_FILE] or None)


def parse_metadata(path: Path, text: str | bytes | None) -> dict[str, Any]:
    if not text:
        raise UserError(f"{path}: no iopfl metadata (not written by `iopfl export`)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{path}: unreadable iopfl metadata") from None
    if meta.get("format_version") != 1:
        raise UserError(f"{path}: iopfl metadata format {meta.get('format_version')} (this version reads 1)")
    return meta


def predict_with_file(model_file: Path, inputs: list[Path], out: Path, device: str | None = None) -> list[Path]:
    """``iopfl predict --model-file``: segment files/folders as ``iopfl predict`` does with a run,
    preparing them as the file's metadata says; masks come out at each input's size."""
    net, meta = load_exported(model_file, device)
    network = {
        "image_size": meta["input"]["image_size"],
        "context": meta["input"]["context"],
        "in_channels": meta["input"]["channels"],
        "num_classes": meta["output"]["num_classes"],
    }
    return predict_inputs(net, network, inputs, out, PREDICT_BATCH)
