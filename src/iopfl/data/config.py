"""Data settings (the ``data.`` config section)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SyntheticConfig(BaseModel):
    """Size of the generated multi-site dataset (``data.synthetic.``)."""

    model_config = ConfigDict(extra="forbid")
    sites: int = Field(6, ge=2, le=26, description="number of sites (SiteA, SiteB, …)")
    cases: int = Field(8, ge=3, description="cases (volumes) per site")
    size: int = Field(64, ge=16, description="in-plane size in pixels")
    slices: int = Field(16, ge=3, description="slices per volume")
    seed: int = Field(0, description="random seed of the generated sites")


class DataConfig(BaseModel):
    """Where the sites' images come from and how they are prepared and split."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["synthetic", "prostate", "fundus", "folder"] = Field(
        description="the dataset format (the data formats page describes each layout)"
    )
    root: str | None = Field(None, description="dataset folder (synthetic: where to generate; default: cache)")
    sites: list[str] | None = Field(None, description="site subset, in this order (default: all found)")
    holdout: str | None = Field(None, description="site left out of training (outside personalization)")
    image_size: int = Field(64, gt=0, description="in-plane size after resizing; divisible by 16")
    cache_dir: str | None = Field(None, description="preprocessed-array cache (default ~/.cache/iopfl or $IOPFL_CACHE)")
    val_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="share of a site's cases drawn for validation where no split is given"
    )
    test_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="share of a site's cases drawn for testing where no split is given"
    )
    split_seed: int = Field(0, description="seed of those drawn splits")
    max_cases_per_site: int | None = Field(None, gt=0, description="debugging knob: load only the first N cases")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @field_validator("image_size")
    @classmethod
    def _divisible(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"must be divisible by 16 (got {value})")
        return value
