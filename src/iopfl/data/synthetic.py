"""Seeded synthetic multi-site data in the SAML NIfTI layout (the embedded default).

Every case is an organ-like smooth 3D blob (an ellipsoid deformed by low-frequency noise) among two
unlabelled distractor structures, in textured tissue. Sites differ the way hospitals do:

* appearance: intensity curve (gamma), contrast and offset, organ/background contrast (one site
  shows the organ darker than its surroundings), multiplicative bias field, blur, noise, voxel size;
* anatomy and annotation style: organ size and position, and a site-specific boundary convention
  (labels drawn tighter or looser than the organ by 1–2 voxels).

So one global model must compromise across sites, and a personalized one can do better on some.
Same arguments → byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from iopfl.errors import UserError

SITE_NAMES = [f"Site{chr(ord('A') + i)}" for i in range(26)]


@dataclass(frozen=True)
class SiteStyle:
    gamma: float
    contrast: float
    offset: float
    organ_level: float  # organ intensity relative to tissue 0.4 (below 0.4: darker organ)
    bias: float  # bias-field strength
    blur: float  # in-plane Gaussian sigma, voxels
    noise: float
    spacing_xy: float
    spacing_z: float
    organ_scale: float
    shift: float  # organ centre offset, fraction of the field of view
    annotation: int  # label boundary: +n dilations / −n erosions


def site_styles(n: int, seed: int) -> list[SiteStyle]:
    """Per-site settings: a fixed spread of conventions, with seeded jitter."""
    rng = np.random.default_rng([seed, 7919])
    annotations = [0, 2, -1, 1, 0, -2]
    organ_levels = [0.8, 0.75, 0.85, 0.7, 0.15, 0.8]
    gammas = [1.0, 0.6, 1.5, 1.0, 1.2, 0.8]
    styles = []
    for i in range(n):
        j = i % 6
        styles.append(
            SiteStyle(
                gamma=gammas[j] * float(rng.uniform(0.95, 1.05)),
                contrast=float(rng.uniform(0.6, 1.6)),
                offset=float(rng.uniform(-0.2, 0.2)),
                organ_level=organ_levels[j],
                bias=float(rng.uniform(0.0, 0.5)),
                blur=float(rng.choice([0.0, 0.6, 1.2])),
                noise=float(rng.uniform(0.02, 0.12)),
                spacing_xy=float(rng.uniform(0.5, 1.0)),
                spacing_z=float(rng.uniform(2.5, 4.0)),
                organ_scale=float(rng.uniform(0.8, 1.2)),
                shift=float(rng.uniform(-0.12, 0.12)),
                annotation=annotations[j],
            )
        )
    return styles


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], grid: int = 4) -> np.ndarray:
    """Low-frequency random field in [-1, 1] of ``shape`` (cubic upsampling of a coarse grid)."""
    coarse = rng.uniform(-1, 1, size=(grid, grid, max(2, grid // 2)))
    zoom = [s / c for s, c in zip(shape, coarse.shape, strict=True)]
    return ndimage.zoom(coarse, zoom, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))


def make_case(rng: np.random.Generator, style: SiteStyle, size: int, slices: int) -> tuple[np.ndarray, np.ndarray]:
    """One volume ``[X, Y, Z]`` (float32) and its label (uint8)."""
    shape = (size, size, slices)
    grid = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), np.linspace(-1, 1, slices), indexing="ij")
    centre = (style.shift + rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08), rng.uniform(-0.1, 0.1))
    radii = np.array([0.32, 0.26, 0.6]) * style.organ_scale * rng.uniform(0.85, 1.15, size=3)
    organ = _ellipsoid(grid, centre, radii) + 0.35 * _smooth_field(rng, shape) < 1.0
    bladder = _ellipsoid(grid, (centre[0] - 0.5, centre[1] + 0.1, 0.0), (0.2, 0.3, 0.5)) < 1.0
    rectum = _ellipsoid(grid, (centre[0] + 0.5, centre[1] - 0.05, 0.0), (0.12, 0.12, 0.8)) < 1.0

    tissue = 0.4 + 0.08 * _smooth_field(rng, shape, grid=8)
    image = np.where(organ, style.organ_level + 0.05 * _smooth_field(rng, shape, grid=6), tissue)
    image = np.where(bladder & ~organ, 0.95, image)
    image = np.where(rectum & ~organ, 0.1, image)
    image = np.clip(image, 0.0, 1.0) ** style.gamma
    image = image * (1.0 + style.bias * _smooth_field(rng, shape, grid=3))
    if style.blur > 0:
        image = ndimage.gaussian_filter(image, sigma=(style.blur, style.blur, 0))
    image = style.offset + style.contrast * image + style.noise * rng.standard_normal(shape)
    label = organ
    if style.annotation > 0:
        label = ndimage.binary_dilation(label, iterations=style.annotation)
    elif style.annotation < 0:
        label = ndimage.binary_erosion(label, iterations=-style.annotation)
    return (1000.0 * image).astype(np.float32), label.astype(np.uint8)


def _save(path: Path, array: np.ndarray, style: SiteStyle) -> None:
    affine = np.diag([style.spacing_xy, style.spacing_xy, style.spacing_z, 1.0])
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _splits(case_ids: list[str]) -> dict[str, list[str]]:
    n = len(case_ids)
    n_eval = max(1, round(0.25 * n))
    return {
        "train": case_ids[: n - 2 * n_eval],
        "val": case_ids[n - 2 * n_eval : n - n_eval],
        "test": case_ids[n - n_eval :],
    }


def generate_synthetic(
    out_dir: Path, sites: int = 6, cases: int = 8, size: int = 64, slices: int = 16, seed: int = 0
) -> Path:
    """Write the dataset to ``out_dir`` (created atomically: a crash leaves no partial dataset)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty; choose a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        styles = site_styles(sites, seed)
        splits = {}
        for s, style in enumerate(styles):
            name = SITE_NAMES[s]
            (tmp / name).mkdir()
            ids = [f"Case{c:02d}" for c in range(cases)]
            for c, case_id in enumerate(ids):
                rng = np.random.default_rng([seed, s, c])
                image, label = make_case(rng, style, size, slices)
                _save(tmp / name / f"{case_id}.nii.gz", image, style)
                _save(tmp / name / f"{case_id}_segmentation.nii.gz", label, style)
            splits[name] = _splits(ids)
        (tmp / "splits.json").write_text(json.dumps({"splits": splits}, indent=1))
        info = {
            "generator": "iopfl synthetic",
            "seed": seed,
            "size": size,
            "slices": slices,
            "sites": {SITE_NAMES[i]: asdict(st) for i, st in enumerate(styles)},
        }
        (tmp / "sites.json").write_text(json.dumps(info, indent=1))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
