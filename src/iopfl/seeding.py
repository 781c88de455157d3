"""Counter-based seeding: every random stream is derived from (seed, purpose, round, site).

Because no random state is carried from one round to the next, a run resumed from a checkpoint at
round r draws exactly what an uninterrupted run draws, and a Flower client reproduces the in-process
client's batches without sharing any state.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed determined by ``seed`` and ``keys`` (stable across processes and platforms)."""
    blob = repr((int(seed),) + tuple(str(k) for k in keys)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def derive_generator(seed: int, *keys: object) -> torch.Generator:
    """A fresh CPU generator seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def normal_on(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """N(0, 1) of ``shape`` drawn on ``device``. A CPU generator cannot fill a CUDA tensor, so there a
    device generator is seeded from one draw of ``generator`` (still reproducible from it)."""
    if device.type == generator.device.type:
        return torch.randn(shape, generator=generator, device=device)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)
