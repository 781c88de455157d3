"""Local training on one client's data: the inner loop every strategy shares.

The trainer holds the client's training samples as stacked tensors and indexes batches from a seeded
permutation, which avoids a DataLoader's per-sample collation (the dominant cost at CPU image sizes).
All randomness (batch order, augmentation) comes from a ``torch.Generator`` the caller seeds, so a
round is reproducible from (seed, round, client) alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from iopfl.data.augment import AugmentSettings, augment_batch
from iopfl.fl.aggregation import StateDict, clone_state
from iopfl.models.losses import segmentation_loss
from iopfl.runtime import autocast

Penalty = Callable[[nn.Module], torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """The local recipe (published: Adam lr 1e-3 amsgrad re-created each round, batch 5, 1 epoch)."""

    epochs: int = 1
    batch_size: int = 5
    lr: float = 1e-3
    amsgrad: bool = True
    ce_weight: float = 0.0
    channels_last: bool = False
    #: "bf16" / "fp16" run the forward pass under autocast (loss and optimizer stay fp32; fp16 with a
    #: gradient scaler)
    precision: str = "fp32"
    #: where the model trains: "cpu", "cuda", "cuda:N" (a resolved ``runtime.device``)
    device: str = "cpu"
    #: ``torch.compile`` the training forward
    compile: bool = False
    #: None: batches are used as they are
    augment: AugmentSettings | None = None
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    weight_decay: float = 0.0
    #: T of the cosine schedule (the run's ``fl.rounds``)
    rounds: int = 1


def scheduled_lr(lr: float, lr_min: float, schedule: str, rounds: int, round_: int) -> float:
    """The learning rate of round ``round_`` (1-based) of ``rounds``: ``lr`` (constant), or cosine from
    ``lr`` at round 1 down to ``lr_min`` at the last round (one round: ``lr``)."""
    if schedule == "constant" or rounds == 1:
        return lr
    progress = (round_ - 1) / (rounds - 1)
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * progress)) / 2


def round_lr(settings: TrainSettings, round_: int) -> float:
    """The learning rate a site trains round ``round_`` with."""
    return scheduled_lr(settings.lr, settings.lr_min, settings.lr_schedule, settings.rounds, round_)


@dataclass
class TrainResult:
    weights: StateDict
    loss: float
    steps: int


def resident(images: torch.Tensor, masks: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The training samples where batches are read from: on ``device`` when they take at most a
    quarter of its free memory (one copy for the whole run), else pinned host memory."""
    if device.type != "cuda":
        return images, masks
    free, _ = torch.cuda.mem_get_info(device)
    if images.nbytes + masks.nbytes <= free // 4:
        return images.to(device), masks.to(device)
    return images.pin_memory(), masks.pin_memory()


def iterate_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of one shuffled epoch over ``n`` samples."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


@contextmanager
def frozen_except(model: nn.Module, trainable: Callable[[str], bool] | None) -> Iterator[list[nn.Parameter]]:
    """Yield the parameters ``trainable`` selects (all when None) with every other parameter's
    ``requires_grad`` off, restored on exit: autograd then skips the frozen weights' gradients, and
    back-propagation stops where nothing upstream is trainable (FedRep's head phase never enters the
    body)."""
    chosen: list[nn.Parameter] = []
    frozen: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if trainable is None or trainable(name):
            chosen.append(p)
        elif p.requires_grad:
            frozen.append(p)
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield chosen
    finally:
        for p in frozen:
            p.requires_grad_(True)


class LocalTrainer:
    """Trains a fresh copy of the model from given weights on one client's samples, on
    ``settings.device``: the samples move there once when they fit in a quarter of its free memory,
    else they stay in pinned host memory and each batch is copied without blocking.

    Args:
        build: makes the (untrained) network; called once, the instance is reused across rounds.
        images: ``[N, C, H, W]`` float32 training inputs.
        masks: ``[N, H, W]`` int64 class maps.
        settings: the local recipe.
    """

    def __init__(
        self, build: Callable[[], nn.Module], images: torch.Tensor, masks: torch.Tensor, settings: TrainSettings
    ):
        if len(images) == 0:
            raise ValueError("a client needs at least one training sample")
        self.settings = settings
        self.device = torch.device(settings.device)
        memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        # Module.to takes memory_format (torch's type stub omits it)
        self.model = build().to(self.device, memory_format=memory_format)  # type: ignore[call-overload]
        self.forward = torch.compile(self.model) if settings.compile else self.model
        self.images_format = memory_format
        self.images, self.masks = resident(images.contiguous(memory_format=memory_format), masks, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if settings.precision == "fp16" else None
        self.round = 1

    def set_round(self, round_: int) -> None:
        """The round the next ``train`` calls belong to (it sets their learning rate)."""
        self.round = round_

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def train(
        self,
        weights: StateDict,
        generator: torch.Generator,
        epochs: int | None = None,
        penalty: Penalty | None = None,
        trainable: Callable[[str], bool] | None = None,
        forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
        extra_params: Sequence[torch.Tensor] = (),
        after_step: Callable[[], None] | None = None,
    ) -> TrainResult:
        """Load ``weights``, run the local epochs, return the new weights (a deep copy).

        Args:
            penalty: extra loss term on the model (FedProx's and Ditto's proximal terms).
            trainable: parameter-name filter; others stay frozen (FedRep's body/head phases).
            forward: replaces ``model(x)`` (APFL's mixture); defaults to the model itself.
            extra_params: further tensors the optimizer updates (APFL's learned α).
            after_step: called after every optimizer step (e.g. projecting α back onto [0, 1]).
        """
        model = self.model
        model.load_state_dict(weights)
        model.train()
        with frozen_except(model, trainable) as params:
            # the fused kernel updates all parameters in one pass (no per-tensor dispatch overhead)
            optimizer = torch.optim.Adam(
                [*params, *extra_params],
                lr=round_lr(self.settings, self.round),
                amsgrad=self.settings.amsgrad,
                weight_decay=self.settings.weight_decay,
                fused=True,
            )
            total, steps = self._epochs(forward or self.forward, optimizer, generator, epochs, penalty, after_step)
        return TrainResult(clone_state(model.state_dict()), total / max(steps, 1), steps)

    def _epochs(
        self,
        run: Callable[[torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        epochs: int | None,
        penalty: Penalty | None,
        after_step: Callable[[], None] | None,
    ) -> tuple[float, int]:
        """The local epochs; returns (summed loss, optimizer steps)."""
        model = self.model
        total, steps = 0.0, 0
        for _ in range(self.settings.epochs if epochs is None else epochs):
            for idx in iterate_batches(self.num_samples, self.settings.batch_size, generator):
                images, masks = self._batch(idx, generator)
                with autocast(self.device, self.settings.precision):
                    logits = run(images)
                loss = segmentation_loss(logits.float(), masks, self.settings.ce_weight)
                if penalty is not None:
                    loss = loss + penalty(model)
                optimizer.zero_grad(set_to_none=True)
                self._step(loss, optimizer)
                if after_step is not None:
                    after_step()
                total += loss.item()
                steps += 1
        return total, steps

    def _step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def scaler_state(self) -> dict[str, torch.Tensor]:
        """The fp16 gradient scaler's state as tensors (empty without fp16), for the site's checkpoint."""
        if self.scaler is None:
            return {}
        state = self.scaler.state_dict()
        return {
            "scale": torch.tensor(float(state.get("scale", self.scaler.get_scale()))),
            "growth_tracker": torch.tensor(int(state.get("_growth_tracker", 0))),
        }

    def load_scaler_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.scaler is not None and tensors:
            self.scaler.load_state_dict(
                {
                    **self.scaler.state_dict(),
                    "scale": float(tensors["scale"]),
                    "_growth_tracker": int(tensors["growth_tracker"]),
                }
            )

    def _batch(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, C, H, W]`` and masks ``[B, H, W]`` of the indexed samples on the training device,
        augmented when configured (without augmentation nothing is drawn from ``generator``, so such runs
        keep their batch orders)."""
        images = self.images[idx].to(self.device, non_blocking=True)
        masks = self.masks[idx].to(self.device, non_blocking=True)
        if self.settings.augment is None:
            return images, masks
        images, masks = augment_batch(images, masks, self.settings.augment, generator)
        return images.contiguous(memory_format=self.images_format), masks
