"""Writing matplotlib figures: one place that picks the headless backend and writes PNGs atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; set before pyplot is imported anywhere below
import matplotlib.pyplot as plt

from iopfl.fileio import atomic_write


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """``fig`` as a PNG at ``path`` (written whole or not at all), then closed."""
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return Path(path)
