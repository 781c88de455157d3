"""A federation on this machine (``iopfl train``): the sites in this process, or spread over worker
processes with ``runtime.workers`` > 1 — the entry point that picks the transport and resolves the runtime."""

from __future__ import annotations

from pathlib import Path

from iopfl.config import Config
from iopfl.engine.federation import Federation
from iopfl.engine.inprocess import InProcessSites
from iopfl.engine.rundir import RunDir
from iopfl.engine.transport import Progress, Sites
from iopfl.engine.workers import WorkerSites
from iopfl.fl import STRATEGIES
from iopfl.runtime import Runtime


def local_sites(cfg: Config, overlay_dir: Path) -> Sites:
    """The sites of ``cfg.data`` in worker processes (each resolves its own runtime) or, with one
    worker or a pooled method, in this process under this machine's resolved and applied runtime."""
    if cfg.runtime.workers > 1 and not STRATEGIES[cfg.fl.method].pooled:
        return WorkerSites(cfg, overlay_dir, cfg.runtime.workers)
    runtime = Runtime.resolve(cfg.runtime)
    runtime.apply()
    return InProcessSites(cfg, runtime, overlay_dir)


def in_process_run(cfg: Config, run_dir: Path, progress: Progress | None = None) -> Federation:
    """A federated run over the sites of ``cfg.data`` on this machine, writing ``run_dir``."""
    return Federation(cfg, run_dir, local_sites(cfg, RunDir(run_dir).plots / "overlays"), progress)
