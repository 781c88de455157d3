"""What a federated run mirrors into TensorBoard beyond its metrics lines (docs/TRACKING.md): the
learning rate of each round, the config, and the rounds val selection has chosen. A mirror only:
nothing here is read back, and the run's results never depend on it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from iopfl.config import Config
from iopfl.engine.rundir import RunDir
from iopfl.fl.training import scheduled_lr
from iopfl.results import GLOBAL, PERSONALIZED
from iopfl.track import Scalar, TensorBoard


def training_lr(cfg: Config, round_: int) -> float:
    """The learning rate every site trained ``round_`` with (``train``'s schedule over ``fl.rounds``)."""
    t = cfg.train
    return scheduled_lr(t.lr, t.lr_min, t.lr_schedule, cfg.fl.rounds, round_)


def open_board(
    cfg: Config, run: RunDir, note: Callable[[str], None], models: tuple[str, ...], last_round: int | None
) -> None:
    """Mirror ``run``'s metrics lines into RUN/tensorboard/ from the round after ``last_round`` on (None: a
    new run, which also logs its config; the last round: the run only finishes, and hides nothing);
    nothing when ``track.tensorboard`` is off."""
    if not cfg.track.tensorboard:
        return
    first = 0 if last_round is None else None if last_round >= cfg.fl.rounds else last_round + 1
    board = TensorBoard(run.tensorboard_dir, note, first_step=first)
    if last_round is None:
        board.config(cfg.model_dump(mode="json"), cfg.to_yaml(), [f"test/dice/{m}/mean" for m in models])
    run.tensorboard = board


def selection_scalars(
    models: tuple[str, ...], global_round: int | None, personal_best: dict[str, dict[str, Any]], round_: int
) -> list[Scalar]:
    """The rounds val selection has chosen by ``round_``: the global model's, each site's personalised one's."""
    chosen: list[Scalar] = []
    if GLOBAL in models and global_round:
        chosen.append(("selection/global", global_round, round_))
    if PERSONALIZED in models:
        chosen += [
            (f"selection/{PERSONALIZED}/{s}", b["round"], round_) for s, b in personal_best.items() if b.get("round")
        ]
    return chosen
