"""A tiny synthetic run configuration shared by the end-to-end tests (seconds on 2 cores).

Small, but it learns within three rounds (a high learning rate), so that the numbers the tests compare
(resume, determinism, selection) vary from round to round and a wrong implementation shows.
"""

from pathlib import Path

import pytest

from iopfl.config import Config, build_config
from iopfl.engine.federation import Federation
from iopfl.engine.local import in_process_run


def tiny_tree(cache: Path, method: str = "iopfl", rounds: int = 3, sites: int = 3) -> dict:
    return {
        "seed": 0,
        "data": {
            "source": "synthetic",
            "image_size": 32,
            "cache_dir": str(cache),
            "synthetic": {"sites": sites, "cases": 4, "size": 32, "slices": 4, "seed": 0},
        },
        "model": {"width": 8, "depth": 2},
        "fl": {"method": method, "rounds": rounds},
        "train": {"batch_size": 4, "lr": 0.01},
        "eval": {"eval_every": 1, "overlays": 1},
    }


def tiny_config(cache: Path, overrides: list[str] = (), **kw) -> Config:
    return build_config(tiny_tree(cache, **kw), list(overrides))


def interrupt_then_resume(cfg: Config, run_dir: Path, monkeypatch, round_: int = 3) -> dict:
    """Run ``cfg`` in ``run_dir``, interrupted (KeyboardInterrupt) as round ``round_`` starts training,
    then resumed from its checkpoint to the end: the resumed run's results."""
    original = Federation._train_round

    def crash(self, r):
        if r == round_:
            raise KeyboardInterrupt
        original(self, r)

    monkeypatch.setattr(Federation, "_train_round", crash)
    with pytest.raises(KeyboardInterrupt):
        in_process_run(cfg, run_dir).run()
    monkeypatch.setattr(Federation, "_train_round", original)
    return in_process_run(cfg, run_dir).run(resume=True)
