"""A tiny synthetic run configuration shared by the end-to-end tests (seconds on 2 cores).

Small, but it learns within three rounds (a high learning rate), so that the numbers the tests compare
(resume, determinism, selection) vary from round to round and a wrong implementation shows.
"""

from pathlib import Path

from iopfl.config import Config, build_config


def tiny_tree(cache: Path, method: str = "iopfl", rounds: int = 3, sites: int = 3) -> dict:
    return {
        "seed": 0,
        "data": {"source": "synthetic", "image_size": 32, "cache_dir": str(cache),
                 "synthetic": {"sites": sites, "cases": 4, "size": 32, "slices": 4, "seed": 0}},
        "model": {"width": 8, "depth": 2},
        "fl": {"method": method, "rounds": rounds},
        "train": {"batch_size": 4, "lr": 0.01},
        "eval": {"eval_every": 1, "overlays": 1},
    }


def tiny_config(cache: Path, overrides: list[str] = (), **kw) -> Config:
    return build_config(tiny_tree(cache, **kw), list(overrides))
