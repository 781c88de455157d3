"""Retinal fundus optic disc/cup, DoFE layout: ``ROOT/DomainK/<train|test>/ROIs/<image|mask>/<name>.png``.

Mask grey levels: 0 = cup, 128 = disc rim, 255 = background, so disc = (≤ 128) and cup = (== 0).
Classes: 0 background, 1 rim, 2 cup; evaluated regions: disc = {1, 2}, cup = {2}. Val is a seeded
draw from train (the layout has no val split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iopfl.data.base import SiteData, Source
from iopfl.data.config import DataConfig
from iopfl.data.images2d import image_to_case, pair_files
from iopfl.data.prostate import site_dirs
from iopfl.data.splits import random_split


def fundus_classes(mask: np.ndarray) -> np.ndarray:
    grey = mask[..., 0]
    return np.where(grey == 0, 2, np.where(grey <= 128, 1, 0)).astype(np.uint8)


def _is_domain(path: Path) -> bool:
    return (path / "train" / "ROIs").is_dir() or (path / "test" / "ROIs").is_dir()


def load_site(root: Path, site_dir: Path, cfg: DataConfig) -> SiteData:
    name = site_dir.name
    parts = {}
    for split in ("train", "test"):
        rois = site_dir / split / "ROIs"
        pairs = pair_files(rois / "image", rois / "mask") if rois.is_dir() else {}
        ids = list(pairs)[: cfg.max_cases_per_site] if cfg.max_cases_per_site else list(pairs)
        parts[split] = [image_to_case(name, f"{split}/{s}", *pairs[s], cfg.image_size, fundus_classes) for s in ids]
    ids = [c.case_id for c in parts["train"]]
    draw = (
        random_split(ids, cfg.val_fraction, 0.0, cfg.split_seed, name)
        if len(ids) >= 2
        else {"train": ids, "val": [], "test": []}
    )
    by_id = {c.case_id: c for c in parts["train"]}
    if len(ids) >= 2 and not draw["val"]:
        draw = {"train": ids[1:], "val": ids[:1]}
    return SiteData(name, [by_id[i] for i in draw["train"]], [by_id[i] for i in draw["val"]], parts["test"])


def discover(root: Path, cfg: DataConfig) -> list[Path]:
    return site_dirs(root, cfg.sites, _is_domain, "train|test/ROIs/image|mask/")


SOURCE = Source(
    "fundus",
    discover,
    load_site,
    in_channels=3,
    num_classes=3,
    regions={"disc": [1, 2], "cup": [2]},
    context=0,
    class_names=("background", "rim", "cup"),  # label 1 is the disc minus the cup
)
