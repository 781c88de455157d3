"""Reading images and volumes, and the preprocessing every source shares.

Every reader turns a library's exception into a UserError naming the file, so a truncated, empty or
mislabelled file is one clear line rather than a traceback from PIL or nibabel.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from iopfl.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: not a readable file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes)")


def read_image(path: Path, mode: str) -> np.ndarray:
    """A 2D image as an array: ``mode`` "RGB" → ``[H, W, 3]`` uint8, "L" → ``[H, W]``."""
    _check_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert(mode))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"{path}: unreadable or truncated image ({type(exc).__name__})") from None


def read_mask_rgb(path: Path) -> np.ndarray:
    """A 2D mask with every channel kept: ``[H, W, C]`` uint8 (C = 1 for grey masks)."""
    _check_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img.convert("RGB") if img.mode not in ("L", "1") else img.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"{path}: unreadable or truncated mask ({type(exc).__name__})") from None
    return arr[..., None] if arr.ndim == 2 else arr


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A 3D volume ``[X, Y, Z]`` float32 with its affine and voxel sizes (mm)."""
    _check_file(path)
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image):  # NIfTI-2 is a subclass
            raise UserError(f"{path}: not a NIfTI image ({type(img).__name__})")
        kind = img.get_data_dtype().kind
        if kind not in "biuf":
            raise UserError(f"{path}: unsupported voxel data type {img.get_data_dtype()} (expected integers or floats)")
        data = np.asarray(img.dataobj, dtype=np.float32)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        affine = np.asarray(img.affine, dtype=np.float64)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 — nibabel raises many types (ImageFileError, EOFError, ...)
        raise UserError(f"{path}: unreadable or truncated NIfTI ({type(exc).__name__})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise UserError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data, affine, zooms


# Tolerances of the image/mask grid check: headers written by different tools round differently.
SPACING_TOL = 1e-3  # relative, per axis
ORIGIN_TOL = 1e-2  # of the smallest voxel size
DIRECTION_TOL = 1e-3  # per element of the unit direction cosines


def check_same_grid(image: Path, image_affine: np.ndarray, label: Path, label_affine: np.ndarray) -> None:
    """A mask must lie on its image's voxel grid: the same spacing, origin and direction (within
    small tolerances), not only the same shape — else it labels the wrong voxels."""

    def split(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        linear = affine[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        return spacing, affine[:3, 3], linear / np.where(spacing > 0, spacing, 1.0)

    (s1, o1, d1), (s2, o2, d2) = split(image_affine), split(label_affine)
    problems = []
    if not np.allclose(s1, s2, rtol=SPACING_TOL, atol=0):
        problems.append(f"spacing {np.round(s2, 4).tolist()} vs {np.round(s1, 4).tolist()} mm")
    if not np.allclose(o1, o2, rtol=0, atol=ORIGIN_TOL * float(s1.min())):
        problems.append(f"origin {np.round(o2, 3).tolist()} vs {np.round(o1, 3).tolist()} mm")
    if not np.allclose(d1, d2, rtol=0, atol=DIRECTION_TOL):
        problems.append("direction (orientation) differs")
    if problems:
        raise UserError(f"{label}: does not lie on the voxel grid of its image {image}: " + "; ".join(problems))


def check_finite(array: np.ndarray, path: Path) -> None:
    if not np.isfinite(array).all():
        raise UserError(f"{path}: contains non-finite intensities (NaN or inf)")


def zscore(array: np.ndarray, clip_percentiles: tuple[float, float] | None = None) -> np.ndarray:
    """Intensity normalisation; a constant image becomes zeros instead of NaN."""
    a = array.astype(np.float32)
    if clip_percentiles is not None:
        lo, hi = np.percentile(a, clip_percentiles)
        a = np.clip(a, lo, hi)
    std = float(a.std())
    return (a - float(a.mean())) / std if std > 1e-8 else np.zeros_like(a)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``[N, C, H, W]`` float images to ``[N, C, size, size]``."""
    if images.shape[-2:] == (size, size):
        return images.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).numpy()


def resize_masks(masks: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``[N, H, W]`` label maps (labels are never blended)."""
    shape = (size, size) if isinstance(size, int) else tuple(size)
    if masks.shape[-2:] == shape:
        return masks.astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))[:, None].float()
    return F.interpolate(t, size=shape, mode="nearest").squeeze(1).to(torch.uint8).numpy()


def storage_round(image: np.ndarray) -> np.ndarray:
    """Round to float16 precision: the cache stores float16, so fresh and cached loads agree exactly."""
    return image.astype(np.float16).astype(np.float32)
