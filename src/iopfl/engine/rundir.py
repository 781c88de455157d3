"""The run directory (docs/ARCHITECTURE.md, "Run directory"): where every output of a run lives, written safely.

``config.yaml``, ``manifest.json``, ``metrics.jsonl``, ``run.log``, ``results.json``, ``checkpoints/``,
``experts/`` (published personalised models), ``report.md``, ``plots/``, ``tensorboard/`` (a mirror of the
metrics, docs/TRACKING.md). JSON files are replaced atomically; ``metrics.jsonl`` is append-only and
trimmed back to the checkpointed round on resume, so it never holds lines of a round that is re-run.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from iopfl.errors import UserError
from iopfl.fileio import atomic_write_text
from iopfl.results import METRICS_FILE, RESULTS_FILE, EvalLine, TrainLine, append_metrics, read_metrics, write_metrics
from iopfl.track import TensorBoard


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensorboard: TensorBoard | None = None  # set while a run writes: mirrors every metrics line

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.safetensors"

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def results(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def expert(self, site: str) -> Path:
        """Where a site's published personalised model is stored."""
        return self.path / "experts" / f"{site}.safetensors"

    def create(self) -> None:
        try:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
            self.plots.mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot create the run directory ({exc.strerror})") from None
        # temp files of writes a crash interrupted; the files they were to replace are intact
        for stale in self.path.rglob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def append_metrics(self, lines: Sequence[TrainLine | EvalLine]) -> None:
        append_metrics(self.metrics, lines)
        if self.tensorboard is not None:
            self.tensorboard.metrics([line.dump() for line in lines])

    def trim_metrics(self, last_round: int) -> None:
        """Keep only lines of rounds ≤ ``last_round`` (those the checkpoint already covers)."""
        write_metrics(self.metrics, [line for line in read_metrics(self.metrics) if line.round <= last_round])


class RunLog:
    """``run.log`` of a run directory — what happened to which site, with times — mirrored to a logger."""

    def __init__(self, run_dir: RunDir, logger: logging.Logger):
        self.path, self.logger = run_dir.path / "run.log", logger

    def _write(self, level: int, text: str) -> None:
        self.logger.log(level, "[iopfl] %s", text)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {'WARNING ' if level >= logging.WARNING else ''}{text}\n")

    def note(self, text: str) -> None:
        """Something a user should know about (a site left out, a node gone)."""
        self._write(logging.WARNING, text)

    def info(self, text: str) -> None:
        self._write(logging.INFO, text)


def git_commit() -> str | None:
    """The commit of the iopfl source tree, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def manifest(seed: int, config_digest: str) -> dict[str, Any]:
    """Versions, seed, config hash and git commit: what is needed to reproduce a run."""
    import monai
    import numpy
    import torch

    import iopfl

    return {
        "iopfl": iopfl.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "seed": seed,
        "config_hash": config_digest,
        "git_commit": git_commit(),
        "command": sys.argv,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
