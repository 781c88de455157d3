"""Data sources → :class:`DatasetSpec`: per-site train/val/test cases, ready for training.

``load_dataset(cfg)`` dispatches on ``cfg.source`` (synthetic | prostate | fundus | folder) and caches
each site's preprocessed cases on disk, keyed by its files and the settings.
"""

from __future__ import annotations

import logging
from pathlib import Path

from iopfl.data.base import Case, DatasetSpec, SiteData, SliceDataset, Source, case_inputs
from iopfl.data.cache import cache_dir, cache_key, cached_cases
from iopfl.data.config import DataConfig, SyntheticConfig
from iopfl.errors import UserError

log = logging.getLogger(__name__)
PARTS = ("train", "val", "test")


def _tag(site: SiteData) -> list[Case]:
    for part in PARTS:
        for case in getattr(site, part):
            case.meta["split"] = part
    return site.all_cases()


def _untag(name: str, cases: list[Case]) -> SiteData:
    return SiteData(name, *([c for c in cases if c.meta.get("split") == p] for p in PARTS))


def _site_files(site_dir: Path) -> list[Path]:
    return [p for p in site_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]


def _load_site(source: Source, root: Path, site_dir: Path, cfg: DataConfig) -> SiteData:
    """One site through the cache: its entry is keyed by its files, the split file and the settings."""
    settings = cfg.model_dump(mode="json", exclude={"cache_dir", "holdout", "synthetic", "sites", "root"})
    files = _site_files(site_dir) + ([root / "splits.json"] if (root / "splits.json").exists() else [])
    key = cache_key(files, {**settings, "source": source.name, "site": site_dir.name})
    cases = cached_cases(cache_dir(cfg.cache_dir), key, lambda: _tag(source.load_site(root, site_dir, cfg)))
    return _untag(site_dir.name, cases)


def synthetic_root(cfg: DataConfig) -> Path:
    """Where the synthetic dataset lives: ``data.root`` or a cache folder named by its settings."""
    from iopfl.data.synthetic import generate_synthetic

    s = cfg.synthetic
    root = (
        Path(cfg.root)
        if cfg.root
        else cache_dir(cfg.cache_dir) / (f"synthetic-s{s.sites}-c{s.cases}-{s.size}px-{s.slices}sl-seed{s.seed}")
    )
    if not (root / "splits.json").exists():
        log.info("generating synthetic dataset in %s", root)
        generate_synthetic(root, s.sites, s.cases, s.size, s.slices, s.seed)
    return root


def source_of(name: str) -> Source:
    """The :class:`Source` behind a ``data.source`` name (synthetic data is read as prostate)."""
    from iopfl.data import folder, fundus, prostate

    return {
        "prostate": prostate.SOURCE,
        "synthetic": prostate.SOURCE,
        "fundus": fundus.SOURCE,
        "folder": folder.SOURCE,
    }[name]


def load_dataset(cfg: DataConfig) -> DatasetSpec:
    """The dataset ``cfg`` describes; every bad input is a UserError naming the file."""
    source = source_of(cfg.source)
    if cfg.source == "synthetic":
        root = synthetic_root(cfg)
    elif cfg.root is None:
        raise UserError(f"data.root: required for data.source={cfg.source}")
    else:
        root = Path(cfg.root)
    sites = {d.name: _load_site(source, root, d, cfg) for d in source.discover(root, cfg)}
    for name, site in sites.items():
        if not site.all_cases():
            raise UserError(f"{root / name}: no cases")
    return DatasetSpec(cfg.source, sites, source.in_channels, source.num_classes, source.regions, source.context)


def load_unlabelled(path: Path, image_size: int) -> list[Case]:
    """Cases of an ``iopfl adapt``/``predict`` input folder: NIfTI volumes, 2D images, or a site folder
    (``images/`` + ``masks/``, as for training). Labels are read where the folder has them (a site
    folder's masks, ``*_segmentation`` volumes) so that the outside site can be scored; the methods
    never see them."""
    from iopfl.data.folder import is_flat
    from iopfl.data.images2d import load_image_folder, load_site_folder
    from iopfl.data.io import is_nifti
    from iopfl.data.prostate import load_volume_folder

    if not path.is_dir():
        raise UserError(f"{path}: folder not found")
    if is_flat(path):
        return load_site_folder(path, image_size)
    if any(is_nifti(p) for p in path.iterdir()):
        return load_volume_folder(path, image_size)
    return load_image_folder(path, image_size)


__all__ = [
    "Case",
    "DataConfig",
    "DatasetSpec",
    "SiteData",
    "SliceDataset",
    "SyntheticConfig",
    "case_inputs",
    "load_dataset",
    "load_unlabelled",
    "source_of",
]
