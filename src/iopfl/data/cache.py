"""On-disk cache of preprocessed cases, keyed by the source files and the settings.

Entries are ``.npz`` files read with ``allow_pickle=False`` (no code can run from the cache) and
written atomically. The key covers every source file's path, size and modification time, so editing
or replacing a file invalidates the entry; a damaged entry is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from iopfl.data.base import Case, PackedMask
from iopfl.fileio import atomic_write_bytes

log = logging.getLogger(__name__)
FORMAT = 2  # bump when preprocessing changes meaning (2: original-grid masks and spacing)


def cache_dir(configured: str | None) -> Path:
    return Path(configured or os.environ.get("IOPFL_CACHE") or Path.home() / ".cache" / "iopfl")


def cache_key(files: Iterable[Path], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, "settings": settings}, sort_keys=True).encode())
    for f in sorted(str(p) for p in files):
        st = os.stat(f)
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _encode(cases: list[Case]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for i, c in enumerate(cases):
        arrays[f"image{i}"] = c.image.astype(np.float16)
        if c.mask is not None:
            arrays[f"mask{i}"] = c.mask
        if c.original_mask is not None:
            arrays[f"original{i}"] = c.original_mask.planes
        meta.append(
            {
                "site": c.site,
                "case_id": c.case_id,
                "spacing": list(c.spacing),
                "source": c.source,
                "meta": c.meta,
                "labelled": c.mask is not None,
                "original_shape": c.original_mask.shape if c.original_mask is not None else None,
                "original_spacing": c.original_spacing,
            }
        )
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return arrays


def _decode(data: Any) -> list[Case]:
    meta = json.loads(bytes(data["meta"]).decode())
    return [
        Case(
            m["site"],
            m["case_id"],
            data[f"image{i}"].astype(np.float32),
            data[f"mask{i}"] if m["labelled"] else None,
            tuple(m["spacing"]),
            m["source"],
            m["meta"],
            PackedMask(tuple(m["original_shape"]), data[f"original{i}"]) if m["original_shape"] else None,
            tuple(m["original_spacing"]) if m["original_spacing"] else None,
        )
        for i, m in enumerate(meta)
    ]


def cached_cases(root: Path, key: str, build: Callable[[], list[Case]]) -> list[Case]:
    """The cases stored under ``key``, or ``build()`` them and store them."""
    path = root / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                return _decode(data)
        except Exception as exc:  # noqa: BLE001 — any damage: rebuild rather than fail
            log.warning("ignoring damaged cache entry %s (%s)", path, type(exc).__name__)
    cases = build()
    try:
        root.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        arrays: dict[str, Any] = _encode(cases)  # np.savez's stub would take a key "allow_pickle" for its flag
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:  # a read-only cache must not stop a run
        log.warning("cannot write cache %s (%s)", path, exc)
    return cases
