"""Typed run configuration: YAML file + ``key=value`` overrides, validated with pydantic.

Every section forbids unknown keys, so a typo is an error naming the key rather than a silently
ignored setting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from iopfl import CONFIG_DIR as CONFIG_DIR  # defined once, in the package root (no heavy imports)
from iopfl.adapt.config import AdaptConfig
from iopfl.data.augment import AugmentSettings
from iopfl.data.config import DataConfig
from iopfl.errors import UserError
from iopfl.fl import STRATEGIES, StrategyParams
from iopfl.fl.training import TrainSettings
from iopfl.runtime import Runtime, RuntimeConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The 2D U-Net (BatchNorm) every method trains."""

    width: int = Field(8, gt=0, description="channels of the first U-Net stage (32 in the paper)")
    depth: int = Field(3, ge=1, le=6, description="down-sampling stages (4 in the paper)")


class FLConfig(_Section):
    """Federation settings; every other ``fl.<key>`` is a parameter of the chosen method, validated
    against that strategy's own ``Params`` (an unknown one is an error naming the key)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    method: str = Field(
        "iopfl",
        description="the federated strategy (an unknown name is an error listing the "
        "known ones); its own parameters are the fl.<parameter> keys below",
    )
    rounds: int = Field(10, gt=0, description="communication rounds")
    local_epochs: int = Field(1, gt=0, description="local epochs each sampled site trains per round")
    client_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="share of the sites sampled each round (seeded by the round)"
    )
    min_clients: int = Field(
        1, ge=1, description="fewest sites that must reply for a round to count; fewer stops the run"
    )
    publish_personal: bool = Field(
        True,
        description="in-process: every site publishes its val-selected "
        "personalised model at the end (a simulation; on Flower each site opts in)",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown method '{value}' (choose from {', '.join(STRATEGIES)})")
        return value

    @model_validator(mode="after")
    def _method_params(self) -> FLConfig:
        params = STRATEGIES[self.method].Params
        try:
            resolved = params(**(self.model_extra or {}))
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            if first["type"] == "extra_forbidden":
                known = ", ".join(f"fl.{k}" for k in params.model_fields) or "none"
                message = f"not a parameter of method '{self.method}' (its parameters: {known})"
            else:
                message = first["msg"]
            raise PydanticCustomError(KEYED, "{message}", {"key": key, "message": message}) from None
        # the resolved config (config.yaml, the digest) lists every parameter with its value
        self.__pydantic_extra__ = resolved.model_dump()
        return self

    def strategy_params(self) -> StrategyParams:
        return STRATEGIES[self.method].Params(**(self.model_extra or {}))


class TrainConfig(_Section):
    """Local training at every site (the loss is soft Dice, plus cross-entropy when ``ce_weight`` > 0)."""

    batch_size: int = Field(5, gt=0, description="local training batch (slices or images)")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate (Adam is re-created every round)")
    amsgrad: bool = Field(True, description="Adam's AMSGrad variant (as the published recipe)")
    ce_weight: float = Field(0.0, ge=0.0, description="weight of cross-entropy added to soft Dice")
    augment: Literal["none", "standard"] = Field(
        "none",
        description="standard: per training batch, random h/v flips and quarter turns, an affine (zoom, "
        "rotation, shift ≤ 5 %), gamma/contrast/brightness (+ light per-channel colour jitter for RGB sources, "
        "never across 2.5D slices), Gaussian noise or blur; masks follow the same warp (nearest)",
    )
    aug_scale: float = Field(0.15, ge=0.0, le=1.0, description="zoom drawn from [1/(1+s), 1+s]")
    aug_rotate: float = Field(15.0, ge=0.0, le=180.0, description="rotation ± degrees (after a quarter turn)")
    aug_intensity: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="brightness/contrast/gamma/colour/noise/blur strength s (0 = off): "
        "brightness ± s std, contrast and γ in [e^−s, e^s], noise σ ≤ s/2, blur σ ≤ 5·s px",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="learning rate over rounds; cosine: round t of T = fl.rounds trains at "
        "lr_min + (lr − lr_min)·(1 + cos(π(t−1)/(T−1)))/2",
    )
    lr_min: float = Field(0.0, ge=0.0, description="the cosine schedule's last-round learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="Adam weight decay")

    @model_validator(mode="after")
    def _floor_below_lr(self) -> TrainConfig:
        if self.lr_min > self.lr:
            raise ValueError(f"train.lr_min ({self.lr_min}) exceeds train.lr ({self.lr})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, tree: Any) -> Any:
        for key in MOVED_TO_RUNTIME:
            if isinstance(tree, dict) and key in tree:
                raise PydanticCustomError(KEYED, "{message}", {"key": key, "message": f"moved: use runtime.{key}"})
        return tree


class EvalConfig(_Section):
    """Evaluation of every reported model on every site's val and test cases."""

    eval_every: int = Field(1, gt=0, description="evaluate every N rounds (and always at the last round)")
    batch_size: int = Field(32, gt=0, description="inference batch (slices or images)")
    overlays: int = Field(3, ge=0, description="prediction overlays drawn in the report")


class TrackConfig(_Section):
    """Experiment tracking: mirrors of what a run writes, never read back by iopfl (docs/TRACKING.md)."""

    tensorboard: bool = Field(
        True,
        description="write TensorBoard event files: RUN/tensorboard/ for "
        "train, demo and the Flower server; OUT/tensorboard/<method>/ for adapt",
    )


class Config(_Section):
    seed: int = Field(0, description="every random stream (batch order, sampling, augmentation) derives from it")
    data: DataConfig = Field(default_factory=lambda: DataConfig(source="synthetic"))
    model: ModelConfig = Field(default_factory=ModelConfig)
    fl: FLConfig = Field(default_factory=FLConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)

    def train_settings(self, runtime: Runtime) -> TrainSettings:
        """The local recipe, computed where ``runtime`` (this config's ``runtime`` section, resolved) says."""
        t = self.train
        return TrainSettings(
            epochs=self.fl.local_epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            amsgrad=t.amsgrad,
            ce_weight=t.ce_weight,
            channels_last=runtime.channels_last,
            precision=runtime.precision,
            augment=self.augment_settings(),
            lr_schedule=t.lr_schedule,
            lr_min=t.lr_min,
            weight_decay=t.weight_decay,
            rounds=self.fl.rounds,
            device=str(runtime.device),
            compile=runtime.compile,
        )

    def augment_settings(self) -> AugmentSettings | None:
        """The training augmentation, or None; colour jitter only where channels are colours (2D
        sources), never across the 2.5D prostate input's neighbouring slices."""
        t = self.train
        if t.augment == "none":
            return None
        from iopfl.data import source_of

        return AugmentSettings(
            scale=t.aug_scale,
            rotate=t.aug_rotate,
            intensity=t.aug_intensity,
            colour=source_of(self.data.source).context == 0,
        )

    def for_sites(self, sites: list[str] | None, root: str | None = None) -> Config:
        """A site's (or a worker's) view of this config: only ``sites`` (None: every site of the
        dataset), nothing held out, and its own data ``root`` when given; validated like a file."""
        tree = self.model_dump(mode="json")
        tree["data"].update(sites=sites, holdout=None, **({"root": root} if root is not None else {}))
        return build_config(tree, origin="config of sites " + ", ".join(sites or ["(all)"]))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def digest(self) -> str:
        """Short hash of what determines training (recorded in the manifest, checked on resume): the
        resolved config without its ``adapt`` section, which only test-time adaptation reads — so a
        finished run can be re-adapted, and an interrupted one resumed, under other adapt settings —
        and without ``track``, which only mirrors what a run writes."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"adapt", "track"}), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["fl.rounds=3", "data.sites=[A,B]"]`` → ``[("fl.rounds", 3), ("data.sites", ["A", "B"])]``."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}': expected key=value, e.g. fl.rounds=3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    return pairs


KEYED = "keyed"  # an error a section raises for one of its keys (the message names it)
MOVED_TO_RUNTIME = ("precision", "channels_last", "threads")


def _format_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    if first["type"] == KEYED:
        loc.append(first["ctx"]["key"])
    key = ".".join(loc)
    msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    return f"{origin}: config key '{key}': {msg}"


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``, or a UserError naming it."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not a readable YAML file ({type(exc).__name__})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a config must be a YAML mapping of sections")
    return tree


def build_config(tree: dict[str, Any], overrides: Sequence[str] = (), origin: str = "config") -> Config:
    """Validate ``tree`` with ``overrides`` applied; errors name the offending key."""
    tree = json.loads(json.dumps(tree))  # deep copy of plain data
    for key, value in parse_overrides(list(overrides)):
        _set_path(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UserError(_format_error(err, origin)) from None


def load_config(path: Path | None, overrides: Sequence[str] = ()) -> Config:
    """The config in ``path`` (defaults when None) with ``overrides`` applied."""
    tree = read_yaml(path) if path is not None else {}
    return build_config(tree, overrides, origin=str(path) if path else "config")
