"""SAML multi-site prostate MRI (NIfTI): ``ROOT/<SITE>/CaseNN.nii.gz`` + ``CaseNN_segmentation.nii.gz``.

Preprocessing: per-volume z-score after clipping to the 0.5–99.5 percentiles (robust to the bright
outliers of MRI), in-plane resize to S×S, slices along the last NIfTI axis, 2.5D input of three
slices. Label > 0 is prostate. Splits: ``ROOT/splits.json`` if present, else the published splits
shipped with the package, else a seeded draw by case.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from iopfl.data.base import Case, SiteData, Source, original_labels
from iopfl.data.config import DataConfig
from iopfl.data.io import (
    check_finite,
    check_same_grid,
    is_nifti,
    nifti_stem,
    read_nifti,
    resize_images,
    resize_masks,
    storage_round,
    zscore,
)
from iopfl.data.splits import Split, check_split, packaged_splits, random_split, read_split_file
from iopfl.errors import UserError

SEGMENTATION = re.compile(r"^(?P<case>.+)_[Ss]egmentation$")
CONTEXT = 1


def find_pairs(site_dir: Path) -> dict[str, tuple[Path, Path]]:
    """case id → (image, segmentation); an image without a segmentation or the reverse is an error."""
    images, labels = {}, {}
    for path in sorted(site_dir.iterdir()):
        if not is_nifti(path):
            continue
        stem = nifti_stem(path)
        match = SEGMENTATION.match(stem)
        if match:
            labels[match["case"]] = path
        else:
            images[stem] = path
    for case, path in images.items():
        if case not in labels:
            raise UserError(f"{path}: image without segmentation (expected {case}_segmentation.nii.gz)")
    for case, path in labels.items():
        if case not in images:
            raise UserError(f"{path}: segmentation without image (expected {case}.nii.gz)")
    if not images:
        raise UserError(f"{site_dir}: no NIfTI image/segmentation pairs")
    return {c: (images[c], labels[c]) for c in images}


def volume_to_case(site: str, case_id: str, image_path: Path, label_path: Path | None, size: int) -> Case:
    """Read, check, normalise and resize one volume; slices ``[S, 1, size, size]``."""
    data, affine, zooms = read_nifti(image_path)
    check_finite(data, image_path)
    mask = original = None
    if label_path is not None:
        labels, label_affine, _ = read_nifti(label_path)
        if labels.shape != data.shape:
            raise UserError(f"{label_path}: shape {labels.shape} differs from its image {data.shape}")
        check_same_grid(image_path, affine, label_path, label_affine)
        full = np.moveaxis(labels > 0, 2, 0).astype(np.uint8)  # [Z, X, Y]
        mask = resize_masks(full, size)
        original = original_labels(full, mask)
    x, y, z = data.shape
    slices = np.moveaxis(zscore(data, (0.5, 99.5)), 2, 0)[:, None]  # [Z, 1, X, Y]
    image = storage_round(resize_images(slices, size))
    spacing = (zooms[2], zooms[0] * x / size, zooms[1] * y / size)
    meta = {"format": "nifti", "shape": [x, y, z], "affine": affine.tolist()}
    return Case(site, case_id, image, mask, spacing, str(image_path), meta, original, (zooms[2], zooms[0], zooms[1]))


def resolve_splits(root: Path, site: str, case_ids: list[str], cfg: DataConfig) -> Split:
    split_file = root / "splits.json"
    if split_file.exists():
        splits, origin = read_split_file(split_file), str(split_file)
    else:
        splits, origin = packaged_splits(), "packaged prostate_splits.json"
    if site not in splits:
        return random_split(case_ids, cfg.val_fraction, cfg.test_fraction, cfg.split_seed, site)
    check_split(splits[site], set(case_ids), site, origin)
    return splits[site]


def site_dirs(root: Path, wanted: list[str] | None, is_site, expected: str) -> list[Path]:
    """The selected site folders under ``root`` (all qualifying ones when ``wanted`` is None);
    ``expected`` describes a site folder's contents for the error message."""
    if not root.is_dir():
        raise UserError(f"{root}: dataset root not found")
    if wanted is None:
        found = [p for p in sorted(root.iterdir()) if p.is_dir() and is_site(p)]
        if not found:
            raise UserError(f"{root}: no site folders found (expected {expected})")
        return found
    for site in wanted:
        if not (root / site).is_dir():
            raise UserError(f"{root / site}: site folder not found")
        if not is_site(root / site):
            raise UserError(f"{root / site}: not a site folder (expected {expected})")
    return [root / s for s in wanted]


def load_site(root: Path, site_dir: Path, cfg: DataConfig) -> SiteData:
    pairs = find_pairs(site_dir)
    split = resolve_splits(root, site_dir.name, list(pairs), cfg)
    chosen = [c for part in ("train", "val", "test") for c in split[part]]
    if cfg.max_cases_per_site:
        chosen = chosen[: cfg.max_cases_per_site]
    cases = {c: volume_to_case(site_dir.name, c, *pairs[c], cfg.image_size) for c in chosen}
    parts = {p: [cases[c] for c in split[p] if c in cases] for p in ("train", "val", "test")}
    return SiteData(site_dir.name, **parts)


def has_nifti(path: Path) -> bool:
    return any(is_nifti(p) for p in path.iterdir())


def discover(root: Path, cfg: DataConfig) -> list[Path]:
    return site_dirs(root, cfg.sites, has_nifti, "CaseNN.nii.gz + CaseNN_segmentation.nii.gz files")


SOURCE = Source(
    "prostate",
    discover,
    load_site,
    in_channels=1 + 2 * CONTEXT,
    num_classes=2,
    regions={"prostate": [1]},
    context=CONTEXT,
    class_names=("background", "prostate"),
)


def load_volume_folder(folder: Path, size: int) -> list[Case]:
    """Unlabelled NIfTI volumes of a folder (segmentation files, if any, are used as labels)."""
    images = [p for p in sorted(folder.iterdir()) if is_nifti(p) and not SEGMENTATION.match(nifti_stem(p))]
    if not images:
        raise UserError(f"{folder}: no NIfTI volumes")
    cases = []
    for path in images:
        stem = nifti_stem(path)
        label = next(
            (
                p
                for p in folder.iterdir()
                if is_nifti(p) and (m := SEGMENTATION.match(nifti_stem(p))) and m["case"] == stem
            ),
            None,
        )
        cases.append(volume_to_case(folder.name, stem, path, label, size))
    return cases
