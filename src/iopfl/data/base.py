"""Data containers shared by every source, and 2.5D sample assembly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass(frozen=True)
class PackedMask:
    """A class map ``[S, H, W]`` kept as bit planes (``np.packbits``, one plane per bit of the largest
    class): the original-resolution masks of the polyp sites are ~670 Mpx, an eighth of that as bits."""

    shape: tuple[int, int, int]
    planes: np.ndarray  # uint8 [P, ⌈S·H·W / 8⌉]

    @classmethod
    def pack(cls, mask: np.ndarray) -> PackedMask:
        bits = max(1, int(mask.max(initial=0)).bit_length())
        flat = mask.astype(np.uint8).ravel()
        s, h, w = (int(n) for n in mask.shape)
        return cls((s, h, w), np.stack([np.packbits((flat >> b) & 1) for b in range(bits)]))

    def unpack(self) -> np.ndarray:
        """The class map, uint8 ``[S, H, W]``."""
        count = int(np.prod(self.shape))
        out = np.zeros(count, np.uint8)
        for b, plane in enumerate(self.planes):
            out |= np.unpackbits(plane, count=count) << b
        return out.reshape(self.shape)


@dataclass
class Case:
    """One case: a 3D volume (S slices) or a 2D image (S = 1), preprocessed.

    ``image``: float32 ``[S, C, H, W]``; ``mask``: uint8 ``[S, H, W]`` class indices or None when
    unlabelled; ``spacing``: mm per voxel along (S, H, W) after resizing ((1, 1, 1) = pixels);
    ``meta``: what writing a prediction back needs (original shape, affine, format).
    Metrics are computed on the original grid: ``original_mask`` holds the labels there (``[S, H0, W0]``;
    None when unlabelled or when that grid is the mask's own), ``original_spacing`` its voxel size
    (None: ``spacing``).
    """

    site: str
    case_id: str
    image: np.ndarray
    mask: np.ndarray | None
    spacing: tuple[float, float, float]
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    original_mask: PackedMask | None = None
    original_spacing: tuple[float, float, float] | None = None

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])

    @property
    def original_size(self) -> tuple[int, int]:
        """In-plane size ``(H0, W0)`` of the input file (NIfTI: its first two axes)."""
        shape = self.meta.get("shape")
        return (int(shape[0]), int(shape[1])) if shape else tuple(self.image.shape[-2:])

    def labels(self) -> np.ndarray:
        """``mask``, uint8 ``[S, H, W]``, of a case that must be labelled (training, scoring)."""
        if self.mask is None:
            raise ValueError(f"{self.site}/{self.case_id} is unlabelled")
        return self.mask

    def truth(self) -> np.ndarray:
        """Labels on the original grid, uint8 ``[S, H0, W0]``, of a labelled case."""
        return self.original_mask.unpack() if self.original_mask is not None else self.labels()

    def grid_spacing(self) -> tuple[float, float, float]:
        """Voxel size of the original grid: mm for volumes, (1, 1, 1) = pixels for 2D images."""
        return self.original_spacing or self.spacing


def original_labels(full: np.ndarray, resized: np.ndarray) -> PackedMask | None:
    """``full [S, H0, W0]`` packed for scoring, or None when resizing kept the grid (``resized`` is it)."""
    return None if full.shape == resized.shape else PackedMask.pack(full)


@dataclass
class SiteData:
    name: str
    train: list[Case]
    val: list[Case]
    test: list[Case]

    def all_cases(self) -> list[Case]:
        return self.train + self.val + self.test


@dataclass
class DatasetSpec:
    name: str
    sites: dict[str, SiteData]
    in_channels: int
    num_classes: int
    regions: dict[str, list[int]]
    context: int


@dataclass(frozen=True)
class Source:
    """A data format: how to find its site folders, load one site, and what the network sees."""

    name: str
    discover: Callable[[Path, Any], list[Path]]  # (root, DataConfig) → site folders
    load_site: Callable[[Path, Path, Any], SiteData]  # (root, site folder, DataConfig) → site
    in_channels: int
    num_classes: int
    regions: dict[str, list[int]]
    context: int
    class_names: tuple[str, ...]  # one per label value, 0 (background) first; exported models carry them

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")


def neighbours(num_slices: int, context: int) -> torch.Tensor:
    """2.5D stacking: the indices ``[S, 2·context+1]`` of each slice and its ``context`` neighbours on
    either side, in order, edges replicated."""
    offsets = torch.arange(-context, context + 1)
    return (torch.arange(num_slices)[:, None] + offsets).clamp_(0, num_slices - 1)


def case_inputs(case: Case, context: int) -> torch.Tensor:
    """Network inputs ``[S, C·(2·context+1), H, W]``: each slice with its neighbours, edges replicated."""
    image = torch.from_numpy(case.image)
    if context == 0:
        return image
    return image[neighbours(len(image), context)].flatten(1, 2)  # [S, 2c+1, C, H, W] → [S, (2c+1)·C, H, W]


class SliceDataset(Dataset):
    """2D training samples ``(image [C_in, H, W] float32, mask [H, W] int64)`` from labelled cases."""

    def __init__(self, cases: list[Case], context: int):
        self.cases, self.context = cases, context
        self.index = [(i, s) for i, c in enumerate(cases) for s in range(c.num_slices)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        c, s = self.index[i]
        case = self.cases[c]
        picks = neighbours(case.num_slices, self.context)[s].numpy()
        image = torch.from_numpy(case.image[picks]).flatten(0, 1)
        return image, torch.from_numpy(case.labels()[s].astype(np.int64))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples stacked once: ``([N, C_in, H, W], [N, H, W])`` for DataLoader-free training."""
        images = torch.cat([case_inputs(c, self.context) for c in self.cases])
        masks = torch.cat([torch.from_numpy(c.labels().astype(np.int64)) for c in self.cases])
        return images.contiguous(), masks
