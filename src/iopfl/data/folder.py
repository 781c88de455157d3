"""Generic 2D site folders: ``ROOT/<SITE>/images`` + ``ROOT/<SITE>/masks`` (same stems), or
``ROOT/<SITE>/<train|val|test>/image`` + ``.../mask``.

Serves the polyp sites (Kvasir-SEG, CVC-ClinicDB, BKAI-IGH NeoPolyp) and the prostate slice sample.
Flat layouts are split by a seeded draw over groups: CVC-ClinicDB's ``README.txt`` frame→sequence
table keeps every video sequence in one split; elsewhere each image is its own group.
"""

from __future__ import annotations

import re
from pathlib import Path

from iopfl.data.base import Case, SiteData, Source
from iopfl.data.config import DataConfig
from iopfl.data.images2d import image_to_case, pair_files
from iopfl.data.prostate import site_dirs
from iopfl.data.splits import random_split

SPLIT_NAMES = ("train", "val", "test")
SEQUENCE_ROW = re.compile(r"(\d+)\s+to\s+(\d+)\s*\|\s*(\d+)")


def is_flat(path: Path) -> bool:
    return (path / "images").is_dir() and (path / "masks").is_dir()


def _is_split(path: Path) -> bool:
    return any((path / s / "image").is_dir() for s in SPLIT_NAMES)


def is_site(path: Path) -> bool:
    return is_flat(path) or _is_split(path)


def sequence_groups(site_dir: Path, stems: list[str]) -> dict[str, str] | None:
    """frame stem → sequence id from a CVC-ClinicDB style README.txt, when the site has one."""
    readme = site_dir / "README.txt"
    if not readme.is_file():
        return None
    ranges = [(int(a), int(b), seq) for a, b, seq in SEQUENCE_ROW.findall(readme.read_text(errors="replace"))]
    if not ranges:
        return None
    groups = {}
    for stem in stems:
        frame = int(stem) if stem.isdigit() else None
        seq = next((s for a, b, s in ranges if frame is not None and a <= frame <= b), None)
        groups[stem] = f"seq{seq}" if seq else stem
    return groups


def _cases(site: str, pairs: dict[str, tuple[Path, Path]], stems: list[str], size: int, prefix: str = "") -> list[Case]:
    return [image_to_case(site, prefix + s, *pairs[s], size) for s in stems]


def load_flat_site(site_dir: Path, cfg: DataConfig) -> SiteData:
    pairs = pair_files(site_dir / "images", site_dir / "masks")
    stems = list(pairs)[: cfg.max_cases_per_site] if cfg.max_cases_per_site else list(pairs)
    split = random_split(
        stems, cfg.val_fraction, cfg.test_fraction, cfg.split_seed, site_dir.name, sequence_groups(site_dir, stems)
    )
    return SiteData(site_dir.name, *(_cases(site_dir.name, pairs, split[p], cfg.image_size) for p in SPLIT_NAMES))


def load_split_site(site_dir: Path, cfg: DataConfig) -> SiteData:
    parts: dict[str, list[Case]] = {}
    for split in SPLIT_NAMES:
        if not (site_dir / split / "image").is_dir():
            parts[split] = []
            continue
        pairs = pair_files(site_dir / split / "image", site_dir / split / "mask")
        stems = list(pairs)[: cfg.max_cases_per_site] if cfg.max_cases_per_site else list(pairs)
        parts[split] = _cases(site_dir.name, pairs, stems, cfg.image_size, prefix=f"{split}/")
    if not parts["val"] and len(parts["train"]) >= 2:
        parts["val"], parts["train"] = parts["train"][:1], parts["train"][1:]
    return SiteData(site_dir.name, parts["train"], parts["val"], parts["test"])


def discover(root: Path, cfg: DataConfig) -> list[Path]:
    return site_dirs(root, cfg.sites, is_site, "images/ + masks/, or train|val|test/image|mask/")


def load_site(root: Path, site_dir: Path, cfg: DataConfig) -> SiteData:
    return load_flat_site(site_dir, cfg) if is_flat(site_dir) else load_split_site(site_dir, cfg)


SOURCE = Source(
    "folder",
    discover,
    load_site,
    in_channels=3,
    num_classes=2,
    regions={"foreground": [1]},
    context=0,
    class_names=("background", "foreground"),
)
