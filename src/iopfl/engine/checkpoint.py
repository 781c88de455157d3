"""Atomic, pickle-free checkpoints: one safetensors file holding tensors plus a JSON state blob.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed over
the old one, so a crash at any point leaves either the previous or the new checkpoint — never a
half-written one. Loading goes through safetensors, which cannot execute code.

A run's checkpoint (format 2) also records the engine that wrote it and the config hash;
:func:`read_run_checkpoint` checks all three before anything is resumed or read from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from iopfl.errors import UserError
from iopfl.fileio import atomic_write

STATE_KEY = "iopfl_state"
RUN_FORMAT = 2
ENGINES = {
    "inprocess": "`iopfl train` (the in-process engine): continue it with `iopfl train CONFIG --out RUN --resume`",
    "flower": "a Flower deployment: continue it by running the ServerApp again with the same run-dir",
}


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Atomically write ``tensors`` and the JSON-serialisable ``state`` to ``path``."""
    payload = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(payload, tmp, metadata={STATE_KEY: json.dumps(state)}))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and state from a checkpoint; any damage is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        state = json.loads(meta[STATE_KEY])
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a valid iopfl checkpoint ({type(exc).__name__}: {exc})") from None
    return tensors, state


def pack(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prefix every key: ``pack("global", sd)`` → ``{"global/conv.weight": ...}``."""
    return {f"{prefix}/{k}": v for k, v in state.items()}


def unpack(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack` for one prefix."""
    head = f"{prefix}/"
    return {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head) and "/" not in k[len(head) :]}


def save_run_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], engine: str, config_hash: str
) -> None:
    """A run's checkpoint: ``state`` plus the format, the engine and the config hash."""
    save_checkpoint(path, tensors, {"format": RUN_FORMAT, "engine": engine, "config_hash": config_hash, **state})


def read_run_checkpoint(
    path: Path, engine: str | None = None, config_hash: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A run's checkpoint, checked: a known format; written by ``engine`` and with ``config_hash``
    when they are given (resuming). Every mismatch is a UserError naming the file."""
    tensors, state = load_checkpoint(path)
    if state.get("format") != RUN_FORMAT or state.get("engine") not in ENGINES:
        raise UserError(
            f"{path}: checkpoint format {state.get('format')!r} of engine {state.get('engine')!r} is "
            f"not one this iopfl reads (format {RUN_FORMAT}); start the run again in a new folder"
        )
    if engine is not None and state["engine"] != engine:
        raise UserError(f"{path}: this run was written by {ENGINES[state['engine']]}")
    if config_hash is not None and state.get("config_hash") != config_hash:
        raise UserError(f"{path}: written with a different config; resume with the run's own config.yaml")
    return tensors, state
