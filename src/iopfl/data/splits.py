"""Case-level train/val/test splits: from a split file, or a seeded draw over groups.

Groups keep related cases together (CVC-ClinicDB frames of one video sequence), so no patient or
sequence ever appears in two splits.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from iopfl.errors import UserError

Split = dict[str, list[str]]


def packaged_splits() -> dict[str, Split]:
    """The published SAML prostate case splits shipped with the package."""
    text = resources.files("iopfl.data").joinpath("prostate_splits.json").read_text()
    return json.loads(text)["splits"]


def read_split_file(path: Path) -> dict[str, Split]:
    try:
        tree = json.loads(Path(path).read_text())
        splits = tree.get("splits", tree)
        for site, parts in splits.items():
            if not isinstance(parts, dict) or not set(parts) <= {"train", "val", "test"}:
                raise ValueError(f"site {site}")
        return splits
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{path}: not a valid split file ({exc})") from None


def random_split(
    case_ids: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    site: str,
    groups: dict[str, str] | None = None,
) -> Split:
    """Seeded draw of whole groups (default: one group per case) into train/val/test.

    Val and test each get at least one group when there are three or more groups.
    """
    groups = groups or {c: c for c in case_ids}
    names = sorted(set(groups[c] for c in case_ids))
    rng = np.random.default_rng([seed, *site.encode()])
    order = [names[i] for i in rng.permutation(len(names))]
    n = len(order)
    n_test = max(1 if n >= 3 and test_fraction > 0 else 0, int(math.floor(test_fraction * n + 0.5)))
    n_val = max(1 if n >= 3 and val_fraction > 0 else 0, int(math.floor(val_fraction * n + 0.5)))
    test, val, train = set(order[:n_test]), set(order[n_test : n_test + n_val]), set(order[n_test + n_val :])
    return {
        "train": [c for c in case_ids if groups[c] in train],
        "val": [c for c in case_ids if groups[c] in val],
        "test": [c for c in case_ids if groups[c] in test],
    }


def check_split(split: Split, existing: set[str], site: str, origin: str) -> None:
    """Every case a split names must exist."""
    for part, ids in split.items():
        for case_id in ids:
            if case_id not in existing:
                raise UserError(f"{origin}: site {site} {part} split names case '{case_id}', which does not exist")
