"""Atomic, pickle-free checkpoints: one safetensors file holding tensors plus a JSON state blob.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed over
the old one, so a crash at any point leaves either the previous or the new checkpoint — never a
half-written one. Loading goes through safetensors, which cannot execute code.
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
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head) and "/" not in k[len(head):]}
