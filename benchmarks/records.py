"""Evidence records of long benchmark runs (docs/development.md, "Benchmark records").

A training run lives in a work folder outside the repository (weights: checkpoints, published experts);
when it finishes, its small record — ``config.yaml``, ``manifest.json``, ``results.json``,
``metrics.jsonl``, ``run.log`` — is copied into the repository beside the benchmark's tables. Then:

- record and weights present → nothing to do;
- record present, weights absent (a fresh machine) → tables are built from the record; the run is
  retrained only when a later step needs its weights (re-adaptation);
- weights of an interrupted run → resumed from its checkpoint;
- a record or run of another config → refused with one message (delete it, or pass another --out).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from iopfl.config import Config, build_config
from iopfl.engine.local import in_process_run
from iopfl.engine.rundir import RunDir
from iopfl.errors import UserError

RECORD_FILES = ("config.yaml", "manifest.json", "results.json", "metrics.jsonl", "run.log")


def default_work(out: Path) -> Path:
    """Where the weights of ``out``'s runs live: ``$IOPFL_BENCH_WORK/<out's name>`` or ``~/.cache/iopfl/bench/…``."""
    base = os.environ.get("IOPFL_BENCH_WORK") or Path.home() / ".cache" / "iopfl" / "bench"
    return Path(base) / out.name


def recorded_digest(folder: Path) -> str | None:
    """The training digest of the config a record (or run folder) was made with; None when it has none."""
    config = folder / "config.yaml"
    if not config.exists():
        return None
    return build_config(yaml.safe_load(config.read_text()), origin=str(config)).digest()


def check_same_config(folder: Path, cfg: Config) -> None:
    digest = recorded_digest(folder)
    if digest is not None and digest != cfg.digest():
        raise UserError(
            f"{folder}: holds a run of another config (training digest {digest}, expected "
            f"{cfg.digest()}); delete it or choose another --out"
        )


def has_record(record: Path) -> bool:
    return all((record / name).exists() for name in RECORD_FILES)


def has_weights(run_dir: Path) -> bool:
    return RunDir(run_dir).results.exists() and RunDir(run_dir).checkpoint.exists()


def copy_record(run_dir: Path, record: Path) -> None:
    record.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        shutil.copyfile(run_dir / name, record / name)


def ensure_record(cfg: Config, run_dir: Path, record: Path, need_weights: bool = False) -> str:
    """Make sure ``record`` holds the finished run of ``cfg`` (and ``run_dir`` its weights when
    ``need_weights``): skip, resume or train. Returns what was done: "recorded", "resumed", "trained"."""
    check_same_config(record, cfg)
    check_same_config(run_dir, cfg)
    if has_record(record) and (not need_weights or has_weights(run_dir)):
        return "recorded"
    if not has_weights(run_dir):
        resume = RunDir(run_dir).checkpoint.exists()
        in_process_run(cfg, run_dir).run(resume=resume)
        done = "resumed" if resume else "trained"
    else:
        done = "recorded"
    if not has_record(record):  # a committed record is kept as it is (its timings are the evidence)
        copy_record(run_dir, record)
    return done
