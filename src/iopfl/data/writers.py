"""Write predicted masks back in the input's format: NIfTI with the input's shape and affine for
volumes, PNG at the input's size for 2D images. Predictions arrive on the input's own grid (upsampled
probabilities, see ``iopfl.evaluation.evaluate.labels_on_original_grid``); files are written atomically."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from iopfl.data.base import Case
from iopfl.fileio import atomic_write_bytes


def output_name(case: Case) -> str:
    return case.case_id.replace("/", "__")


def write_prediction(case: Case, pred: np.ndarray, out_dir: Path, num_classes: int) -> Path:
    """Save the class map ``pred [S, H0, W0]`` (the case's original grid) under ``out_dir``; returns the file."""
    if tuple(pred.shape[-2:]) != case.original_size:
        raise ValueError(f"{case.case_id}: prediction {pred.shape} is not on the input's grid {case.original_size}")
    out_dir = Path(out_dir)
    if case.meta.get("format") == "nifti":
        volume = np.moveaxis(pred, 0, 2).astype(np.uint8)  # [X, Y, Z]
        img = nib.Nifti1Image(volume, np.asarray(case.meta["affine"]))
        img.header.set_xyzt_units("mm")
        path = out_dir / f"{output_name(case)}.nii.gz"
        atomic_write_bytes(path, gzip.compress(img.to_bytes(), mtime=0))
        return path
    grey = (pred[0].astype(np.uint16) * (255 // max(1, num_classes - 1))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    path = out_dir / f"{output_name(case)}.png"
    atomic_write_bytes(path, buf.getvalue())
    return path
