"""The shared online protocol of every test-time method.

For each incoming unlabelled batch: ``steps_per_batch`` Adam steps on the method's loss, then predict
that batch with the updated model (dropout off). ``passes`` repeats this over all batches; the
returned predictions are those of the last pass — never a pass chosen by labels, which no method
ever sees. Augmentation randomness is fresh for every batch, drawn from a generator seeded by
(seed, pass, batch index).

``adapt.protocol=published`` follows the published test-time script instead (med-air/IOP-FL,
federated/model_trainer_segmentation.py): 10 passes unless ``passes`` is given (line 88), dropout
active when predicting (the model stays in train mode, line 65, and predicts at line 127), and the
random state re-seeded before every batch (line 94), so every batch of every pass draws the same
augmentations and dropout masks. The reported figure is still the last pass (line 145).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

from iopfl.adapt.config import AdaptConfig
from iopfl.models.routing import load_expert
from iopfl.seeding import derive_generator, derive_seed

StateDict = dict[str, torch.Tensor]


class TTAMethod:
    """Base: no adaptation, the global expert in eval mode (running statistics)."""

    name: ClassVar[str] = ""
    #: True when the method needs personalised experts besides the global model.
    needs_personal: ClassVar[bool] = False

    def __init__(self, experts: Sequence[StateDict], build: Callable[[], nn.Module], config: AdaptConfig,
                 device: torch.device = torch.device("cpu")):
        self.experts, self.build, self.config, self.device = list(experts), build, config, device

    @property
    def published(self) -> bool:
        return self.config.protocol == "published"

    def make_model(self) -> nn.Module:
        """The network to adapt and predict with (fresh for every call of adapt_and_predict)."""
        return load_expert(self.build, self.experts[0], 0)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters the method updates; none → predict only."""
        return []

    def loss(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def start_pass(self, model: nn.Module) -> None:
        """Called before each pass over the batches (a method may reset what it records)."""

    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Softmax ``[B, K, H, W]`` of a batch ``[B, C, H, W]``: eval mode, dropout off (on under the
        published protocol)."""
        model.eval()
        if self.published:
            keep_dropout(model)
        return model(x).softmax(dim=1)

    def adapt_and_predict(self, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Online adaptation over ``batches`` (inputs only, on the CPU) on ``device``; predictions of the
        last pass, on the CPU.

        Router initialisation and dropout draw from torch's global generator: it is seeded here, inside
        a forked RNG state so the caller's random stream is left untouched.
        """
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(derive_seed(self.config.seed, "adapt"))
            return self._run(batches)

    def _run(self, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        model = self.make_model().to(self.device)
        params = self.trainable(model)
        steps = self.config.steps_per_batch if params else 0
        optimizer = torch.optim.Adam(params, lr=self.config.lr) if steps else None
        predictions: list[torch.Tensor] = []
        for pass_ in range(self.config.pass_count if steps else 1):
            self.start_pass(model)
            predictions = []
            for i, batch in enumerate(batches):
                x = batch.to(self.device)
                gen = self._generator(pass_, i)
                for _ in range(steps):
                    model.train()
                    loss = self.loss(model, x, gen)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                predictions.append(self.predict(model, x).cpu())
        return predictions

    def _generator(self, pass_: int, batch: int) -> torch.Generator:
        """Augmentation generator of one batch. Published: the same seed for every batch and pass, and
        torch's global generator (dropout) re-seeded with it too."""
        if self.published:
            torch.manual_seed(derive_seed(self.config.seed, "adapt", "published"))
            return derive_generator(self.config.seed, "adapt", "published")
        return derive_generator(self.config.seed, "adapt", pass_, batch)


def keep_dropout(model: nn.Module) -> None:
    """Dropout layers back in train mode (active) while the rest of ``model`` stays as it is."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
