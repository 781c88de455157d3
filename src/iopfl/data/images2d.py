"""2D image cases (fundus, polyp, slice folders): one image = one case with S = 1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from iopfl.data.base import Case, original_labels
from iopfl.data.io import IMAGE_SUFFIXES, read_image, read_mask_rgb, resize_images, resize_masks, storage_round, zscore
from iopfl.errors import UserError

MaskRule = Callable[[np.ndarray], np.ndarray]  # [H, W, C] uint8 → [H, W] class map


def any_channel_foreground(mask: np.ndarray) -> np.ndarray:
    """Foreground where any channel exceeds 127: white masks, JPEG noise and red/green masks alike."""
    return np.asarray((mask > 127).any(axis=-1), dtype=np.uint8)


def image_files(folder: Path) -> dict[str, Path]:
    """stem → file for the images of a folder (hidden files skipped); two files of one stem are an error."""
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        if p.stem in files:
            raise UserError(f"{p}: duplicate case id '{p.stem}' (also {files[p.stem].name})")
        files[p.stem] = p
    return files


def pair_files(image_dir: Path, mask_dir: Path) -> dict[str, tuple[Path, Path]]:
    """stem → (image, mask); an image without a mask or the reverse is an error naming the file."""
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise UserError(f"{d}: folder not found")
    images, masks = image_files(image_dir), image_files(mask_dir)
    for stem, path in images.items():
        if stem not in masks:
            raise UserError(f"{path}: image without mask (expected {mask_dir / stem}.*)")
    for stem, path in masks.items():
        if stem not in images:
            raise UserError(f"{path}: mask without image (expected {image_dir / stem}.*)")
    if not images:
        raise UserError(f"{image_dir}: no image/mask pairs")
    return {s: (images[s], masks[s]) for s in images}


def image_to_case(
    site: str,
    case_id: str,
    image_path: Path,
    mask_path: Path | None,
    size: int,
    mask_rule: MaskRule = any_channel_foreground,
) -> Case:
    """Read an RGB image (grey replicated) and its mask; normalise per image; resize to size² (the mask
    is also kept at the image's own size, where it is scored)."""
    rgb = read_image(image_path, "RGB")
    mask = original = None
    if mask_path is not None:
        raw = read_mask_rgb(mask_path)
        if raw.shape[:2] != rgb.shape[:2]:
            raise UserError(
                f"{mask_path}: mask size {raw.shape[1]}×{raw.shape[0]} differs from its image "
                f"{rgb.shape[1]}×{rgb.shape[0]}"
            )
        full = mask_rule(raw)[None]
        mask = resize_masks(full, size)
        original = original_labels(full, mask)
    image = storage_round(resize_images(zscore(rgb).transpose(2, 0, 1)[None], size))
    meta = {"format": "image", "shape": list(rgb.shape[:2])}
    return Case(site, case_id, image, mask, (1.0, 1.0, 1.0), str(image_path), meta, original)


def load_image_folder(folder: Path, size: int) -> list[Case]:
    """Unlabelled images of a folder (for ``iopfl adapt``/``predict``)."""
    files = image_files(folder) if folder.is_dir() else {}
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [image_to_case(folder.name, stem, path, None, size) for stem, path in files.items()]


def load_site_folder(folder: Path, size: int) -> list[Case]:
    """Every image/mask pair of a site folder (``images/`` + ``masks/``, same stems), labelled."""
    pairs = pair_files(folder / "images", folder / "masks")
    return [image_to_case(folder.name, stem, image, mask, size) for stem, (image, mask) in pairs.items()]
