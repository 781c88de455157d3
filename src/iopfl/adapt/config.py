"""Settings of outside personalization (the ``adapt.`` config section)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Passes of each protocol when ``passes`` is not given: the published script runs 10 epochs over the
# site's images (med-air/IOP-FL, federated/model_trainer_segmentation.py line 88).
PROTOCOL_PASSES = {"online": 1, "published": 10}


class AdaptConfig(BaseModel):
    """Outside personalization (``iopfl adapt``): test-time adaptation to an unseen site's unlabelled images."""

    model_config = ConfigDict(extra="forbid")
    steps_per_batch: int = Field(1, ge=0, description="optimizer steps on each incoming batch before predicting it")
    passes: int | None = Field(
        None,
        ge=1,
        description="passes over the site's images; the last pass is reported "
        "(None: 1 under the online protocol, 10 under published)",
    )
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the adapted parameters")
    batch_size: int = Field(8, gt=0, description="images (slices) per incoming test batch")
    seed: int = Field(0, description="seed of the augmentation noise, flips and turns (drawn per pass and batch)")
    lambda_entropy: float = Field(10.0, ge=0.0, description="weight λ_H of the per-pixel entropy term")
    lambda_consistency: float = Field(0.1, ge=0.0, description="weight λ_C of the augmentation-consistency term")
    lambda_shape: float = Field(1.0, ge=0.0, description="weight λ_S of the shape (morphological-gradient) term")
    noise_std: float = Field(0.5, ge=0.0, description="consistency noise σ on z-scored intensities")
    shape_kernel: int | None = Field(
        None, ge=3, description="morphological-gradient window (None: 21 px at 384 px, scaled)"
    )
    gate_norm: Literal["softmax", "sigmoid", "sum"] | None = Field(
        None,
        description="gates from the router's logits: softmax (on the simplex: the routed kernel is a mixture "
        "of the experts'), sigmoid (the paper: free scale), sum (sigmoid / its sum); None: softmax "
        "under the online protocol, sigmoid under the published one",
    )
    gate_init: Literal["paper", "global", "uniform"] = Field(
        "paper",
        description="routers start at PyTorch's default init (paper), at the global expert, or at the experts' mean",
    )
    protocol: Literal["online", "published"] = Field(
        "online", description="online: ours; published: the choices of the published test-time script"
    )
    lambda_anchor: float = Field(
        100.0,
        ge=0.0,
        description="weight of the trust region: KL(BN-adapt's prediction ‖ "
        "the routed one) per pixel (iopfl, online protocol)",
    )
    safeguard: bool = Field(
        True,
        description="label-free collapse check after every batch of an adaptive method "
        "(tent, iopfl): roll back to the last safe state when it fails",
    )
    safeguard_agreement: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="safeguard: least Dice between the adapted and the BN-adapt foreground of a batch",
    )
    safeguard_foreground: float = Field(
        1.5,
        gt=1.0,
        description="safeguard: most factor between the adapted and the "
        "BN-adapt predicted foreground fraction of a batch, either way",
    )
    min_batch_stats: int = Field(
        4,
        ge=1,
        description="batches smaller than this normalise with the stream's "
        "statistics instead of their own alone (1: always their own)",
    )

    @property
    def gates(self) -> Literal["softmax", "sigmoid", "sum"]:
        """``gate_norm`` when given, else the protocol's: the published script's raw sigmoid gates, our simplex."""
        return self.gate_norm or ("sigmoid" if self.protocol == "published" else "softmax")

    @property
    def pass_count(self) -> int:
        """Passes actually run: ``passes`` when given, else the protocol's default."""
        return self.passes if self.passes is not None else PROTOCOL_PASSES[self.protocol]
