"""Settings of outside personalization (the ``adapt.`` config section)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class AdaptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps_per_batch: int = Field(1, ge=0, description="optimizer steps on each incoming batch before predicting it")
    passes: int = Field(1, ge=1, description="passes over the site's images; the last pass is reported")
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(8, gt=0, description="images (slices) per incoming test batch")
    seed: int = 0
    lambda_entropy: float = Field(10.0, ge=0.0)
    lambda_consistency: float = Field(0.1, ge=0.0)
    lambda_shape: float = Field(1.0, ge=0.0)
    noise_std: float = Field(0.5, ge=0.0, description="consistency noise σ on z-scored intensities")
    shape_kernel: int | None = Field(None, ge=3, description="morphological-gradient window (None: 21 px at 384 px, scaled)")
    gate_norm: Literal["sigmoid", "sum"] = "sigmoid"
