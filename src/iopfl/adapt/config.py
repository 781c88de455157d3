"""Settings of outside personalization (the ``adapt.`` config section)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class AdaptConfig(BaseModel):
    """Online test-time adaptation settings shared by every method (DESIGN §2.2).

    ``lambda_shape`` = 1: the shape term is a per-pixel mean in [0, 1] (the fraction of the image
    within k/2 px of a foreground edge), so weight 1 makes it count about as much per pixel as one
    tenth of the normalised entropy term (λ_H = 10) — a regulariser that breaks up fragments without
    dominating; much larger weights can pay for an empty prediction, which has no edge at all.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    method: str = Field("iopfl", description="method used when the caller names none (see iopfl.adapt.METHODS)")
    steps_per_batch: int = Field(1, ge=0, description="optimizer steps on each incoming batch before predicting it")
    passes: int = Field(1, ge=1, description="passes over the site's images; the last pass is reported")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate")
    batch_size: int = Field(8, gt=0, description="images (slices) per incoming test batch")
    seed: int = Field(0, description="seeds router initialisation, dropout and augmentations")
    lambda_entropy: float = Field(10.0, ge=0.0, description="λ_H (published: 10)")
    lambda_consistency: float = Field(0.1, ge=0.0, description="λ_C (published: 0.1)")
    lambda_shape: float = Field(1.0, ge=0.0, description="λ_S (this implementation's choice, see above)")
    noise_std: float = Field(0.5, ge=0.0, description="consistency noise σ on z-scored intensities")
    shape_kernel: int | None = Field(None, ge=3, description="morphological-gradient window (None: 21 px at 384 px, scaled)")
    gate_norm: Literal["sigmoid", "sum"] = Field("sigmoid", description="raw sigmoid gates, or divided by their sum")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from iopfl.adapt import METHODS  # the registry imports this module: resolve it at validation time

        if value not in METHODS:
            raise ValueError(f"unknown adaptation method '{value}' (choose from {', '.join(METHODS)})")
        return value
