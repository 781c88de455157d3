"""A site's own store of its personal state, kept on the site's machine (never sent anywhere).

Every ClientApp message runs in a fresh process, and a restarted server starts a new Flower run, so
the personal state (the strategy's ``personal`` tensors and the val-selected personalised model) lives
in files under the node's ``state-dir``: one snapshot per message that changed it, named by
(round, phase) with phase 0 = train and 1 = evaluate.

A message of round r and phase p starts from the newest snapshot *before* (r, p). That makes a
replayed round exact: when the server crashes after sending round r and resumes from its round r−1
checkpoint, each site receives round r again, starts again from its state after round r−1 (not from
the snapshot the interrupted attempt wrote, which is replaced), and the numbers match an
uninterrupted run. Snapshots are written atomically (safetensors, no pickle); old ones are pruned.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from iopfl.engine.checkpoint import load_checkpoint, save_checkpoint

TRAIN, EVALUATE = 0, 1
PUBLISH = 2  # reads the state after the last evaluation; writes none
_NAME = re.compile(r"^r(\d{6})-([01])\.safetensors$")
Key = tuple[int, int]


class SiteStateStore:
    """Snapshots of one site's state for one run (``folder`` = ``<state-dir>/<run-key>-<site>``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _keys(self) -> list[Key]:
        if not self.folder.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.folder.iterdir())
        return sorted((int(m[1]), int(m[2])) for m in found if m)

    def _path(self, key: Key) -> Path:
        return self.folder / f"r{key[0]:06d}-{key[1]}.safetensors"

    def check_not_stale(self, round_: int) -> None:
        """Refuse a message of a round older than one already done (a stale, late delivery): the
        server never goes back further than the round after its checkpoint."""
        keys = self._keys()
        if keys and round_ < keys[-1][0]:
            raise RuntimeError(f"stale message for round {round_}: this site is already at round {keys[-1][0]}")

    def load_before(self, round_: int, phase: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The newest snapshot strictly before (round, phase), or None for a site's first message."""
        earlier = [k for k in self._keys() if k < (round_, phase)]
        return load_checkpoint(self._path(earlier[-1])) if earlier else None

    def latest(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The newest snapshot (the site's state at the end of the run), or None."""
        keys = self._keys()
        return load_checkpoint(self._path(keys[-1])) if keys else None

    def save(self, round_: int, phase: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Write the snapshot of (round, phase); drop later ones (a replaced attempt) and old ones."""
        key = (round_, phase)
        self.folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self._path(key), tensors, meta)
        keys = self._keys()
        stale = [k for k in keys if k > key]
        # a resumed server replays at most the round after its checkpoint: keep every snapshot of
        # rounds ≥ r−1 and the newest older one (the site may have sat out the recent rounds)
        older = [k for k in keys if k[0] < round_ - 1]
        stale += older[:-1]
        for k in stale:
            self._path(k).unlink(missing_ok=True)
