"""Typed run configuration: YAML file + ``key=value`` overrides, validated with pydantic.

Every section forbids unknown keys, so a typo is an error naming the key rather than a silently
ignored setting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from iopfl.adapt.config import AdaptConfig
from iopfl.data.config import DataConfig
from iopfl.errors import UserError
from iopfl.fl import STRATEGIES, StrategyConfig
from iopfl.fl.training import TrainSettings, resolve_precision


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    width: int = Field(8, gt=0, description="channels of the first U-Net stage (32 in the paper)")
    depth: int = Field(3, ge=1, le=6, description="down-sampling stages (4 in the paper)")


class FLConfig(_Section):
    method: str = "iopfl"
    rounds: int = Field(10, gt=0)
    local_epochs: int = Field(1, gt=0)
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="IOP-FL inside EMA weight of the old φ")
    client_fraction: float = Field(1.0, gt=0.0, le=1.0)
    min_clients: int = Field(1, ge=1)
    mu: float = Field(0.01, ge=0.0, description="FedProx proximal weight")
    ditto_lambda: float = Field(0.1, ge=0.0)
    apfl_alpha: float = Field(0.5, ge=0.0, le=1.0)
    apfl_learn_alpha: bool = False
    finetune_epochs: int = Field(1, ge=0)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown method '{value}' (choose from {', '.join(STRATEGIES)})")
        return value

    def strategy_config(self) -> StrategyConfig:
        return StrategyConfig(alpha=self.alpha, mu=self.mu, ditto_lambda=self.ditto_lambda,
                              apfl_alpha=self.apfl_alpha, apfl_learn_alpha=self.apfl_learn_alpha,
                              finetune_epochs=self.finetune_epochs)


class TrainConfig(_Section):
    batch_size: int = Field(5, gt=0)
    lr: float = Field(1e-3, gt=0.0)
    amsgrad: bool = True
    ce_weight: float = Field(0.0, ge=0.0, description="weight of cross-entropy added to soft Dice")
    channels_last: bool = False
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="bf16: CPU autocast in local training; auto: bf16 only where the CPU has bf16 kernels")
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: all cores)")


class EvalConfig(_Section):
    eval_every: int = Field(1, gt=0)
    batch_size: int = Field(32, gt=0)
    overlays: int = Field(3, ge=0, description="prediction overlays drawn in the report")


class Config(_Section):
    seed: int = 0
    data: DataConfig = Field(default_factory=lambda: DataConfig(source="synthetic"))
    model: ModelConfig = Field(default_factory=ModelConfig)
    fl: FLConfig = Field(default_factory=FLConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)

    def train_settings(self) -> TrainSettings:
        return TrainSettings(epochs=self.fl.local_epochs, batch_size=self.train.batch_size,
                             lr=self.train.lr, amsgrad=self.train.amsgrad,
                             ce_weight=self.train.ce_weight, channels_last=self.train.channels_last,
                             precision=resolve_precision(self.train.precision))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def digest(self) -> str:
        """Short hash of the resolved config (recorded in the manifest, checked on resume)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
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


def _format_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
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


def build_config(tree: dict[str, Any], overrides: list[str] = (), origin: str = "config") -> Config:
    """Validate ``tree`` with ``overrides`` applied; errors name the offending key."""
    tree = json.loads(json.dumps(tree))  # deep copy of plain data
    for key, value in parse_overrides(list(overrides)):
        _set_path(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UserError(_format_error(err, origin)) from None


def load_config(path: Path | None, overrides: list[str] = ()) -> Config:
    """The config in ``path`` (defaults when None) with ``overrides`` applied."""
    tree = read_yaml(path) if path is not None else {}
    return build_config(tree, overrides, origin=str(path) if path else "config")
